"""Benchmarking shared by the `moe-dispatch` command and benchmarks/: model presets, setup
factories, the peers every backend is compared with, the machine's roofline, timing, the
bench/profile/tune runners and their reports, and the Triton kernels' machine code compiled
without a GPU (machine_code.py).

Nothing here is imported by `import moe_dispatch`; transformers and matplotlib are imported
only when a peer or a plot asks for them.
"""
