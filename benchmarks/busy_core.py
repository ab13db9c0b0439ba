"""The layer on a quiet machine and then with one core kept busy by another process, against the
peers: whether we stay ahead and slow down no more than the fastest of them (docs/benchmarks.md,
issue "Never slower than a peer, quiet or busy").

    python benchmarks/busy_core.py                      # olmoe-1b-7b x0.5, T = 1, 16, 512, 2 threads
    python benchmarks/busy_core.py --preset mixtral-8x7b --scale 0.25 --tokens 1,64

Runs `moe-dispatch bench` twice with the same arguments; for the second run a spinning Python
process is pinned to the last CPU this process may use. Prints, per token count, our median and
the fastest peer's, quiet and busy, both slowdowns, and marks where we fall behind the peer busy
or slow down more than it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

PEERS = ("hf-eager", "hf-grouped-mm", "torch-grouped-mm")


def bench(args, json_path: Path) -> dict[int, tuple[float, float]]:
    """{tokens: (our median ms, the fastest peer's)} from one `moe-dispatch bench` run."""
    command = [sys.executable, "-m", "moe_dispatch.cli", "bench", "--device", "cpu", "--preset", args.preset,
               "--scale", str(args.scale), "--tokens", args.tokens, "--dtype", args.dtype,
               "--threads", str(args.threads), "--budget", str(args.budget), "--compare", ",".join(PEERS),
               "--json", str(json_path)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = {}
    for record in json.loads(json_path.read_text()):
        peers = [ms for name, ms in record["peers"].items() if name in PEERS and ms is not None]
        results[record["tokens"]] = (record["ms"], min(peers) if peers else float("nan"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tokens", default="1,16,512")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.0, help="timed seconds per point")
    args = parser.parse_args()

    busy_cpu = max(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as folder:
        quiet = bench(args, Path(folder) / "quiet.json")
        spin = f"import os\nos.sched_setaffinity(0, {{{busy_cpu}}})\nwhile True:\n    pass\n"
        spinner = subprocess.Popen([sys.executable, "-c", spin])
        try:
            if spinner.poll() is not None:
                raise RuntimeError(f"the busy process exited at once (status {spinner.returncode})")
            busy = bench(args, Path(folder) / "busy.json")
            if spinner.poll() is not None:
                raise RuntimeError("the busy process stopped during the busy run")
        finally:
            spinner.kill()
            spinner.wait()

    table = Table(title=f"{args.preset} x{args.scale}, {args.dtype}, {args.threads} threads: quiet, then CPU "
                        f"{busy_cpu} kept busy (median ms; peer: the fastest of {', '.join(PEERS)}; "
                        f"x: busy over quiet)")
    for column in ("T", "ours quiet", "ours busy", "ours x", "peer quiet", "peer busy", "peer x",
                   "busy: peer / ours", "ok"):
        table.add_column(column, justify="right")
    for tokens in sorted(quiet):
        (ours_quiet, peer_quiet), (ours_busy, peer_busy) = quiet[tokens], busy[tokens]
        ours_slowdown, peer_slowdown = ours_busy / ours_quiet, peer_busy / peer_quiet
        ok = peer_busy >= ours_busy and ours_slowdown <= peer_slowdown
        table.add_row(str(tokens), f"{ours_quiet:.3g}", f"{ours_busy:.3g}", f"{ours_slowdown:.1f}x",
                      f"{peer_quiet:.3g}", f"{peer_busy:.3g}", f"{peer_slowdown:.1f}x",
                      f"{peer_busy / ours_busy:.2f}x", "yes" if ok else "NO")
    Console().print(table)


if __name__ == "__main__":
    main()
