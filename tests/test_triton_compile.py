"""The Triton kernels compiled for sm_80, sm_86 and sm_120 (about 100 KB of shared memory) and
sm_90 (and sm_89 for the quantized formats) without a GPU, by the ptxas and cuobjdump that ship
with Triton: they catch what the interpreter accepts and the compiler rejects, and spills or
serialized loads no CPU test can see."""

import json
import textwrap

import pytest

from conftest import HAS_TRITON, TRITON_UNAVAILABLE

if not HAS_TRITON:
    pytest.skip(f"the triton backend cannot run here: {TRITON_UNAVAILABLE}", allow_module_level=True)

from moe_dispatch.backends import triton_tuning as configs  # noqa: E402

COMPILE_HELPERS = textwrap.dedent("""
    import json
    from moe_dispatch.activations import ACTIVATIONS
    from moe_dispatch.backends import triton_tuning as configs
    from moe_dispatch.benchmarking.machine_code import BF16_POINTERS as pointers, compile_kernel, machine_code
    from moe_dispatch.kernels.triton import decode, grouped_gemm, wgrad
    from moe_dispatch.kernels.triton.grouped_gemm import activation_args

    SWIGLU, CLAMPED = ACTIVATIONS["swiglu"], ACTIVATIONS["clamped_swiglu"]

    def compiled(fn, arch, pointers, constants, config):
        # (shared memory, stack, spills and int-to-float conversions inside a loop, the matrix
        # instruction, TMA loads, cp.async groups in flight, subnormals flushed): MachineCode
        kernel = compile_kernel(fn, arch, pointers, constants, config.num_warps, config.num_stages)
        return machine_code(kernel).summary()
""")

COMPILE_GEMMS = COMPILE_HELPERS + textwrap.dedent("""
    # the consumer GPUs (about 100 KB of shared memory) and Hopper
    ARCHS = ((80, configs.SMALL_SMEM), (86, configs.SMALL_SMEM), (90, configs.LARGE_SMEM), (120, configs.SMALL_SMEM))
    common = dict(E_PAD=64, GROUP_M=grouped_gemm.GROUP_M, PRECISION="ieee", UPCAST=False, EVEN_K=True)
    fp32 = {name: "*fp32" if kind == "*bf16" else kind for name, kind in pointers.items()}
    report = []
    for arch, budget in ARCHS:
        def check(fn, config, fma=False, interleaved=False, **flags):
            tile = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
            descriptor = {"w_desc": f"tensordesc<bf16[{config.block_n},{config.block_k}]>"} if config.tma else {}
            types = {**(fp32 if fma else pointers), **descriptor, **({"gate_step": "i32"} if interleaved else {})}
            constants = {**common, **tile, **flags}
            if config.tma:
                constants.pop("w_desc", None)
            report.append((arch, budget, fma, config.block_m, config.tma, config.num_stages, str(config),
                           *compiled(fn, arch, types, constants, config)))

        # bf16: the defaults of each regime, and on sm_90 the first TMA candidate of the largest;
        # float32 without TF32 (fma, the FMA dot): the defaults. The split-K GEMM1 leaves its
        # epilogue to the reduction kernel; GEMM2 scatters and scales.
        for elem, fma in ((2, False), (4, True)):
            for rows_per_expert in (1, 32, 1024):
                ups, downs = (configs.gemm_tiles(rows_per_expert, gated, elem, budget, fma) for gated in (True, False))
                for up in [ups[0]] + [c for c in ups if c.tma][:1]:
                    check(grouped_gemm.grouped_gemm_kernel, up, fma, SPLIT_K=2, **activation_args(SWIGLU),
                          h_ptr=None, slot_of_row_ptr=None, weight_of_row_ptr=None)
                for down in [downs[0]] + [c for c in downs if c.tma][:1]:
                    check(grouped_gemm.grouped_gemm_kernel, down, fma, SPLIT_K=1, **activation_args(None),
                          a_rows_ptr=None, h_ptr=None, ws_ptr=None)
            for rows_per_expert in (1, 1024):
                config = configs.act_backward_tiles(rows_per_expert, elem, budget, fma)[0]
                check(grouped_gemm.grouped_gemm_act_backward_kernel, config, fma, **activation_args(SWIGLU))
            if not fma:
                # gpt-oss's GEMM1 and activation backward: the clamped SwiGLU over interleaved gate and
                # up columns (a column step of 2, a runtime argument), h stored, no K split
                config = configs.gemm_tiles(1024, True, elem, budget)[0]
                check(grouped_gemm.grouped_gemm_kernel, config, interleaved=True, SPLIT_K=1,
                      **activation_args(CLAMPED), ws_ptr=None, slot_of_row_ptr=None, weight_of_row_ptr=None)
                config = configs.act_backward_tiles(1024, elem, budget)[0]
                check(grouped_gemm.grouped_gemm_act_backward_kernel, config, interleaved=True,
                      **activation_args(CLAMPED))
            # the two the backward runs: dW_down (dy rows gathered and scaled), dW_gate_up (x
            # rows gathered), with the stage the launcher adds for a gather
            config = configs.wgrad_tiles(elem, budget, fma)[0]
            config = configs.replace(config, num_stages=wgrad.pipeline_stages(config, gathered=True))
            check(wgrad.grouped_wgrad_kernel, config, fma, b_rows_ptr=None)
            check(wgrad.grouped_wgrad_kernel, config, fma, a_rows_ptr=None, a_scale_ptr=None)
            # every bf16 decode candidate (the tuner may keep any), the float32 defaults; DeepSeek-V3 at
            # T=16: 128 slots, 8 choices
            ups = configs.decode_tiles(2048, 8, True, elem, budget, 132, fma)
            downs = configs.decode_tiles(7168, 1, False, elem, budget, 132, fma)
            for config in ups[:1] if fma else ups:
                check(decode.decode_up_kernel, config, fma, **activation_args(SWIGLU), BLOCK_T=decode.MAX_TOKENS,
                      S_PAD=128, K_PAD=8)
            for config in downs[:1] if fma else downs:
                check(decode.decode_down_kernel, config, fma, BLOCK_T=decode.MAX_TOKENS, S_PAD=128)
    print(json.dumps(report))
""")

# each quantized format's kernels (kernels/triton/quantized.py) with the default bf16 tiles, on every
# GPU generation the formats must run on: int8 per channel, int4 g128 and mxfp4 (two codes a
# byte), fp8 in 128x128 blocks (from its bits on sm_80/86, which have no float8 type). GEMM1 of
# a prefill (gated, the codes read as q.mT), the activation backward (q as it is: the other
# orientation) and both decode kernels; for fp8 also both GEMMs of w8a8 (the activations' codes
# and scales read too: float8 dots on sm_89 and newer, float16 ones on sm_80/86).
COMPILE_QUANTIZED = COMPILE_HELPERS + textwrap.dedent("""
    from moe_dispatch.benchmarking.machine_code import QUANTIZED_FORMATS, quantized_weight
    ARCHS = ((80, configs.SMALL_SMEM), (86, configs.SMALL_SMEM), (89, configs.SMALL_SMEM), (90, configs.LARGE_SMEM),
             (120, configs.SMALL_SMEM))
    common = dict(PRECISION="ieee", UPCAST=False, EVEN_K=True)
    report = []
    for arch, budget in ARCHS:
        for fmt in QUANTIZED_FORMATS:
            constants, weight_types = quantized_weight(fmt, arch)
            types = dict(pointers, **weight_types)
            quantized = dict(common, **constants)

            def check(fn, kernel, config, own_types=(), **flags):
                tile = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
                report.append((arch, budget, fmt, kernel, str(config),
                               *compiled(fn, arch, dict(types, **dict(own_types)), {**quantized, **tile, **flags},
                                         config)))

            up = configs.gemm_tiles(1024, True, 2, budget)[0]
            check(grouped_gemm.grouped_gemm_kernel, "gemm1", up, Q_T=True, E_PAD=64, GROUP_M=grouped_gemm.GROUP_M,
                  SPLIT_K=1, **activation_args(SWIGLU), ws_ptr=None, slot_of_row_ptr=None, weight_of_row_ptr=None)
            backward = configs.act_backward_tiles(1024, 2, budget)[0]
            check(grouped_gemm.grouped_gemm_act_backward_kernel, "act_backward", backward, {"stride_wk": "i32"},
                  Q_T=False, stride_wn=1, E_PAD=64, GROUP_M=grouped_gemm.GROUP_M, **activation_args(SWIGLU))
            first = configs.decode_tiles(2048, 8, True, 2, budget, 132)[0]
            check(decode.decode_up_kernel, "decode_up", first, Q_T=True, BLOCK_T=decode.MAX_TOKENS, S_PAD=128, K_PAD=8,
                  **activation_args(SWIGLU))
            second = configs.decode_tiles(7168, 1, False, 2, budget, 132)[0]
            check(decode.decode_down_kernel, "decode_down", second, Q_T=True, BLOCK_T=decode.MAX_TOKENS, S_PAD=128)
            if fmt == "fp8":
                w8a8 = {"a_ptr": "*u8", "a_scales_ptr": "*fp32", "stride_asm": "i32"}
                check(grouped_gemm.grouped_gemm_kernel, "gemm1_w8a8", configs.w8a8_tiles([up], True)[0], w8a8, Q_T=True, E_PAD=64,
                      GROUP_M=grouped_gemm.GROUP_M, SPLIT_K=1, **activation_args(SWIGLU), ws_ptr=None,
                      slot_of_row_ptr=None, weight_of_row_ptr=None)
                down = configs.w8a8_tiles(configs.gemm_tiles(1024, False, 2, budget), False)[0]
                check(grouped_gemm.grouped_gemm_kernel, "gemm2_w8a8", down, w8a8, Q_T=True, E_PAD=64,
                      GROUP_M=grouped_gemm.GROUP_M, SPLIT_K=1, **activation_args(None), a_rows_ptr=None, h_ptr=None,
                      ws_ptr=None)
    print(json.dumps(report))
""")

# every other kernel, with the constants of a DeepSeek-V3 layer (E = 256, H = 7168)
COMPILE_OTHERS = COMPILE_HELPERS + textwrap.dedent("""
    from moe_dispatch.kernels.triton import permute, plan
    more = dict(pointers, counts_ptr="*i32", chunk_counts_ptr="*i32", chunk_base_ptr="*i32",
                row_of_slot_ptr="*i32", index_ptr="*i32", rows_ptr="*i32", src_ptr="*bf16", dst_ptr="*bf16",
                ys_ptr="*bf16", dys_ptr="*bf16", dweights_ptr="*fp32", parts_ptr="*fp32",
                scale_ptr="*fp32", all_placed_ptr="*i1")
    rows, width = permute._tile(7168)
    kernels = [
        (plan.plan_one_launch_kernel, {}, dict(SUB=32, E_PAD=256)),
        (plan.plan_count_kernel, {}, dict(SUB=32, E_PAD=256)),
        (plan.plan_scan_kernel, {}, dict(CB=32, E_PAD=256)),
        (plan.plan_scatter_kernel, {}, dict(SUB=32, E_PAD=256)),
        (permute.gather_rows_kernel, {}, dict(BLOCK_R=rows, BLOCK_W=width)),
        (permute.combine_kernel, {}, dict(TOP_K=8, SLOT_MAJOR=False, BLOCK_T=rows, BLOCK_W=width)),
        (permute.combine_backward_kernel, {}, dict(BLOCK_S=rows, BLOCK_W=width)),
        (permute.invert_rows_kernel, {}, dict(BLOCK=256)),
        (grouped_gemm.splitk_reduce_kernel, {}, dict(SPLIT_K=3, BLOCK_M=16, BLOCK_N=64,
                                                      **activation_args(SWIGLU))),
        (grouped_gemm.row_parts_to_slots_kernel, dict(out_ptr="*fp32"), dict(BLOCK=256)),
        (wgrad.expert_sums_kernel, dict(out_ptr="*fp32"), dict(BLOCK_R=16, BLOCK_N=256)),
    ]
    report = [(fn.__name__, arch, *compiled(fn, arch, {**more, **own}, constants, configs.SAFE))
              for arch in (86, 90) for fn, own, constants in kernels]
    print(json.dumps(report))
""")


def _report(stdout: str) -> list:
    return json.loads(stdout.strip().splitlines()[-1])


# Each script compiles for a minute or more, outside the interpreter: started with the session
# (conftest.py), beside the rest of the suite.
def compiled_early(script: str):
    return pytest.mark.early_python(script, {}, drop="TRITON_INTERPRET")


@compiled_early(COMPILE_GEMMS)
def test_default_configs_compile_for_consumer_gpus_and_hopper(early_python):
    # ptxas and cuobjdump ship with Triton: compile for sm_80, sm_86 and sm_120 (about 100 KB of
    # shared memory) and sm_90 without a GPU, outside the interpreter, and check each default
    # config's machine code:
    # - the shared memory it needs;
    # - spills: none inside a loop, and none at all for bf16 on sm_86 and sm_90. Elsewhere ptxas
    #   keeps a value or two in local memory around the main loop for some tiles, of one
    #   architecture or Triton version and not another, at no cost (float32 without TF32 on
    #   sm_90, bf16 decode tiles on sm_80 with Triton 3.6); a tile that is too large spills
    #   inside the loop instead (3 KB a thread for the FMA dot's gated 64x128x32 on sm_80);
    # - the MMA: on sm_90 the warpgroup MMA (HGMMA) for bf16 tiles of 64 rows and more, the older
    #   HMMA otherwise, none for the FMA dot;
    # - the TMA candidates load their weight tiles with the TMA (UTMALDG);
    # - with 3 stages or more, the main loop computes while loads are in flight.
    # gpt-oss's interleaved clamped SwiGLU (its GEMM1 and activation backward) included.
    report = _report(early_python)
    assert len(report) == 138
    for arch, budget, fma, block_m, tma, stages, config, shared, stack, loop_spills, _, mma, tma_loads, ahead, _ in report:
        assert 0 < shared <= budget, (arch, config, shared)
        assert loop_spills == 0, (arch, fma, config, loop_spills)
        assert stack == 0 or fma or arch not in (86, 90), (arch, config, stack)
        expected = "none" if fma else "HGMMA" if arch == 90 and block_m >= 64 else "HMMA"
        assert mma == expected, (arch, fma, config, mma)
        assert tma_loads == tma, (arch, config)
        assert ahead > 0 or stages < 3, (arch, fma, config)
    assert sum(row[4] for row in report) == 2
    assert sum(row[2] for row in report) == 48


@compiled_early(COMPILE_QUANTIZED)
def test_quantized_kernels_compile_for_every_format_and_gpu_generation(early_python):
    # every format on sm_80, 86, 89, 90 and 120 with the default tiles: within the shared memory
    # of the GPU (printed, per config), no spill in a loop and at most one register's outside
    # (Triton 3.6's ptxas keeps one value around the int4 decode up kernel's loop in local
    # memory on sm_90 and sm_120, stored once before the loop and loaded once after; 3.9's
    # none), no int-to-float conversion instruction in a main loop, and the tensor cores
    # multiply: fp8's w8a8 GEMMs in float8 (QMMA, Hopper's QGMMA) from sm_89 on, in float16
    # (HMMA) below
    report = _report(early_python)
    assert len(report) == 5 * (4 * 4 + 2)
    for arch, budget, fmt, kernel, config, shared, stack, loop_spills, loop_converts, mma, _, ahead, flushes in report:
        print(f"sm_{arch} {fmt:5} {kernel:12} {shared / 1024:5.1f} KB shared, {stack} B stack, {mma}  {config}")
        assert 0 < shared <= budget, (arch, fmt, kernel, config, shared)
        assert stack <= 8 and loop_spills == 0, (arch, fmt, kernel, config, stack, loop_spills)
        # codes become floats through their bits (quantized.py): I2F issues 16 a clock per SM, and
        # the minifloats' subnormal codes go through a float32 product that must keep them
        assert loop_converts == 0 and not flushes, (arch, fmt, kernel, config, loop_converts, flushes)
        if kernel.endswith("w8a8"):
            assert mma == ("HMMA" if arch < 89 else "QGMMA" if arch == 90 else "QMMA"), (arch, kernel, config, mma)
        else:
            assert mma != "none", (arch, fmt, kernel, mma)


@compiled_early(COMPILE_OTHERS)
def test_every_other_kernel_compiles_for_consumer_gpus_and_hopper(early_python):
    # the interpreter accepts some programs the compiler rejects: the plan, data-movement and
    # reduction kernels compile for sm_86 and sm_90 too, without spilling
    report = _report(early_python)
    assert len(report) == 22
    for name, arch, shared, stack, _, _, mma, tma_loads, _, _ in report:
        assert shared <= configs.SMALL_SMEM and stack == 0 and mma == "none", (name, arch, shared, stack, mma)
