"""Expert parallelism on gloo: bytes each token sends, and the exchanges' share of the layer time.

    python benchmarks/bench_distributed.py --world-size 2
    python benchmarks/bench_distributed.py --world-size 4 --tokens 1024 --scale 0.0625

Spawns W CPU processes on loopback, each holding E/W experts of an ExpertParallelMoE with a
preset's shape (DeepSeek-V3, scaled down, by default). Every torch.distributed.all_to_all_single
call is timed and its bytes counted (the [W, E/W] counts exchange included); an exchange's time
includes waiting for the slowest peer, as it does in a real step. Each rank times forward
(inference, no autograd) and forward + backward (training); warm-up runs are untimed and
every timed run starts at a barrier. Last, one row exchange with the layer's split sizes
is timed alone, with no compute around it: the transport's own cost. Medians over runs,
per rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_dispatch.backends import resolve_backend
from moe_dispatch.benchmarking.presets import DTYPES, get_preset
from moe_dispatch.integrations.distributed import ExpertParallelMoE



class ExchangeMeter:
    """Wraps torch.distributed.all_to_all_single: time spent in it, and bytes sent off-rank."""

    def __init__(self):
        self.seconds = 0.0
        self.bytes_off_rank = 0
        self.row_splits = None  # (send, recv) sizes of the last row exchange
        self._all_to_all_single = dist.all_to_all_single
        dist.all_to_all_single = self._timed

    def reset(self) -> None:
        self.seconds, self.bytes_off_rank = 0.0, 0

    def _timed(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
        sizes = input_split_sizes or [input.shape[0] // world] * world
        self.bytes_off_rank += (sum(sizes) - sizes[rank]) * row_bytes
        if input_split_sizes is not None:
            self.row_splits = (input_split_sizes, output_split_sizes)
        start = time.perf_counter()
        result = self._all_to_all_single(output, input, output_split_sizes, input_split_sizes, group, **kw)
        self.seconds += time.perf_counter() - start
        return result


def _run(layer, x, training: bool, meter: ExchangeMeter) -> tuple[float, float, int]:
    """(layer seconds, exchange seconds, bytes sent off-rank) of one timed call."""
    dist.barrier()
    meter.reset()
    start = time.perf_counter()
    if training:
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)
    return time.perf_counter() - start, meter.seconds, meter.bytes_off_rank


def _exchange_alone(meter: ExchangeMeter, hidden: int, dtype, args) -> dict:
    """One row exchange with the layer's last split sizes and no compute around it: the
    transport's own cost, without waiting for slower peers."""
    send, recv = meter.row_splits
    rows = torch.randn(sum(send), hidden).to(dtype)
    received = rows.new_empty(sum(recv), hidden)
    times = []
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        start = time.perf_counter()
        meter._all_to_all_single(received, rows, recv, send)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    rank = dist.get_rank()
    sent = (sum(send) - send[rank]) * hidden * rows.element_size()
    seconds = statistics.median(times)
    return dict(layer_ms=None, exchange_ms=seconds * 1e3, sent_bytes=sent)


def _worker(rank: int, args, port: int, queue) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world_size, timeout=timedelta(minutes=5))
    preset = get_preset(args.preset, args.scale)
    torch.manual_seed(0)
    layer = ExpertParallelMoE(**preset.layer_kwargs(), backend=args.backend, dtype=DTYPES[args.dtype])
    x = torch.randn(args.tokens, preset.hidden_size, generator=torch.Generator().manual_seed(rank))
    # As in a real network, x needs a gradient: training runs all four exchanges.
    x = x.to(DTYPES[args.dtype]).requires_grad_()
    meter = ExchangeMeter()
    rows = {}
    for mode, training in (("forward", False), ("forward+backward", True)):
        for _ in range(args.warmup):
            _run(layer, x, training, meter)
        runs = [_run(layer, x, training, meter) for _ in range(args.repeats)]
        layer_s, exchange_s, sent = (statistics.median(column) for column in zip(*runs))
        rows[mode] = dict(layer_ms=layer_s * 1e3, exchange_ms=exchange_s * 1e3, sent_bytes=sent)
    rows["one exchange alone"] = _exchange_alone(meter, preset.hidden_size, x.dtype, args)
    queue.put((rank, preset.describe(), rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--preset", default="deepseek-v3")
    parser.add_argument("--scale", type=float, default=1 / 16, help="multiplies H and I")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, args, port, queue)) for rank in range(args.world_size)]
    for process in processes:
        process.start()
    results = sorted(queue.get() for _ in processes)
    for process in processes:
        process.join()

    world, k = args.world_size, get_preset(args.preset).top_k
    describe = results[0][1]
    preset = get_preset(args.preset, args.scale)
    element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    model = 2 * k * preset.hidden_size * element * (world - 1) / world
    print(f"{describe}; {world} ranks x {args.tokens} tokens, {args.dtype}, "
          f"local experts on {resolve_backend(torch.device('cpu'), args.backend)}, "
          f"gloo on loopback, {os.cpu_count()} CPUs, medians of {args.repeats}")
    print(f"model, forward: 2 exchanges x k x H x {element} B x (W-1)/W = {model:.0f} B/token off-rank "
          f"({2 * k * preset.hidden_size * element} B/token counting rows a rank keeps)")
    print(f"{'mode':<18} {'rank':>4} {'layer ms':>9} {'exchange ms':>11} {'share':>6} "
          f"{'B/token off-rank':>16} {'GB/s sent':>9}")
    for mode in ("forward", "forward+backward", "one exchange alone"):
        for rank, _, rows in results:
            r = rows[mode]
            alone = r["layer_ms"] is None
            layer = "-" if alone else f"{r['layer_ms']:.1f}"
            share = "-" if alone else f"{r['exchange_ms'] / r['layer_ms']:.1%}"
            rate = r["sent_bytes"] / (r["exchange_ms"] / 1e3) / 1e9
            print(f"{mode:<18} {rank:>4} {layer:>9} {r['exchange_ms']:>11.1f} {share:>6} "
                  f"{r['sent_bytes'] / args.tokens:>16.0f} {rate:>9.2f}")

if __name__ == "__main__":
    main()
