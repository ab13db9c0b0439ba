"""A compact table of saved bench records, checked against the targets of docs/benchmarks.md.

    python -m moe_dispatch.benchmarking.summary RESULTS.json [MORE.json ...] [--markdown]

GPU targets (the triton backend): the fused experts at least 1.3x faster than the
torch._grouped_mm pipeline at every T (quantized experts: 1.2x, the pipeline on their
dequantized values) and faster than transformers' grouped_mm experts; decode (T <= 16) as
CUDA graph replays within 1.5x of the bandwidth bound (an eager call's launches are the
host's, not the bytes'); the grouped GEMM at
least 0.9x torch._grouped_mm's TFLOP/s for T >= 1024; permute and unpermute at least 70% of the
measured copy bandwidth. CPU target (the sweep of benchmarks/cpu_sweep.sh): the fused experts
at least 1.1x faster than the fastest peer that computes them (transformers' implementations
and the torch._grouped_mm pipeline) at every point.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from rich.console import Console
from rich.table import Table

MOE_SPEEDUP = 1.3
QUANTIZED_SPEEDUP = 1.2
DECODE_TOKENS, DECODE_SLACK = 16, 1.5
GEMM_RATIO, GEMM_TOKENS = 0.9, 1024
COPY_FRACTION = 0.7
CPU_SPEEDUP = 1.1
# the peers that compute the experts (dense and bound are yardsticks, not implementations)
IMPLEMENTATIONS = ("hf-eager", "hf-grouped-mm", "torch-grouped-mm")


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def best_peer_speedup(record: dict) -> Optional[float]:
    """The fastest implementation peer's time over ours, or None when none ran."""
    found = [record["speedup"][name] for name in IMPLEMENTATIONS if record["speedup"].get(name) is not None]
    return min(found, default=None)


def targets(record: dict) -> list:
    """[(what the target is, whether this record meets it)] for the targets that apply to it."""
    op, tokens, peers, speedup = record["op"], record["tokens"], record["peers"], record["speedup"]
    if record.get("device", "").startswith("cpu"):
        best = best_peer_speedup(record)
        return [(f">= {CPU_SPEEDUP}x best peer", best >= CPU_SPEEDUP)] if op == "moe_mlp" and best else []
    found = []
    if op == "moe_mlp" and tokens <= DECODE_TOKENS and peers.get("bound") and record.get("cuda_graph"):
        found.append((f"<= {DECODE_SLACK}x bound", record["ms"] <= DECODE_SLACK * peers["bound"]))
    if op == "moe_mlp" and speedup.get("torch-grouped-mm") is not None:
        wanted = QUANTIZED_SPEEDUP if record.get("weights") else MOE_SPEEDUP
        found.append((f">= {wanted}x t-gmm", speedup["torch-grouped-mm"] >= wanted))
    if op == "moe_mlp" and speedup.get("hf-grouped-mm") is not None:
        found.append(("> hf-gmm", speedup["hf-grouped-mm"] > 1))
    if op == "grouped_mm" and tokens >= GEMM_TOKENS and speedup.get("torch-grouped-mm") is not None:
        found.append((f">= {GEMM_RATIO}x t-gmm", speedup["torch-grouped-mm"] >= GEMM_RATIO))
    if op in ("permute", "unpermute"):
        found.append((f">= {COPY_FRACTION:.0%} copy bw", record["roofline"] >= COPY_FRACTION))
    return found


COLUMNS = ("op", "preset", "dtype", "backend", "T", "ms", "TFLOP/s", "GB/s", "roofline", "vs t-gmm",
           "vs hf-eager", "vs best peer", "vs dense", "/ bound", "target", "ok")
TEXT_COLUMNS = ("op", "preset", "dtype", "backend", "target")


def summary_rows(records: list) -> list:
    """One row of cells (COLUMNS) per record."""
    rows = []
    for r in records:
        found = targets(r)
        ok = all(met for _, met in found) if found else None
        bound = r["peers"].get("bound")
        rows.append([
            r["op"] + (f" {r['weights']}" if r.get("weights") else ""),
            r["preset"] if r["scale"] == 1.0 else f"{r['preset']}@{r['scale']:g}", r.get("dtype", "-"),
            r["backend"] + (" graph" if r.get("cuda_graph") else ""),
            str(r["tokens"]), _fmt(r["ms"], ".3f"), _fmt(r["tflops"], ".3g"), _fmt(r["gbps"], ".0f"),
            f"{100 * r['roofline']:.0f}%", _fmt(r["speedup"].get("torch-grouped-mm"), ".2f"),
            _fmt(r["speedup"].get("hf-eager"), ".2f"), _fmt(best_peer_speedup(r), ".2f"),
            _fmt(r["speedup"].get("dense"), ".2f"),
            _fmt(r["ms"] / bound if bound else None, ".2f"), ", ".join(what for what, _ in found),
            {True: "yes", False: "NO", None: ""}[ok],
        ])
    return rows


def summary_table(records: list) -> Table:
    table = Table(title="summary (targets: see docs/benchmarks.md)", title_justify="left", padding=(0, 1))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in TEXT_COLUMNS else "right")
    for row in summary_rows(records):
        table.add_row(*row)
    return table


def summary_markdown(records: list) -> str:
    """The same table in Markdown, to paste into docs/benchmarks.md."""
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "| " + " | ".join("---" if c in TEXT_COLUMNS else "---:" for c in COLUMNS) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(records)]
    return "\n".join(lines)


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_dispatch.benchmarking.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RESULTS.json", help="records saved by bench --json")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    records = []
    for path in args.paths:
        try:
            with open(path) as f:
                found = json.load(f)
            if not (isinstance(found, list) and all(isinstance(r, dict) for r in found)):
                raise ValueError("not a list of records, as bench --json writes")
            records.extend(found)
        except FileNotFoundError:  # a step that did not run here (CUDA graphs on a CPU) or did not finish
            print(f"no results in {path}: that step wrote none")
        except (OSError, ValueError) as exc:
            print(f"skipped {path}: {exc}")
    results = [met for r in records for _, met in targets(r)]
    met, checked = sum(results), len(results)
    note = (f"{met} of {checked} targets met; vs X = X's time / ours (best peer: the fastest of "
            f"{', '.join(IMPLEMENTATIONS)}); / bound = our time over the "
            "bandwidth bound (distinct experts' bytes / measured read bandwidth)")
    if args.markdown:
        print(summary_markdown(records) + "\n\n" + note)
        return 0
    console = Console(width=200)
    console.print(summary_table(records))
    console.print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
