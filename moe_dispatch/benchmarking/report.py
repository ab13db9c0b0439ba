"""Tables and plots of benchmark and profile records."""

from __future__ import annotations

import math
from typing import Iterable, Optional

from rich.console import Console
from rich.table import Table


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _speedup(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _groups(records: list) -> dict:
    groups: dict = {}
    for r in records:
        dtype = r["dtype"] if not r.get("weights") else f"{r['dtype']}, {r['weights']} weights"
        key = (r["op"], r["preset"], r["scale"], dtype, r["routing"], r["backward"], r.get("cuda_graph", False))
        groups.setdefault(key, []).append(r)
    return groups


def bench_tables(records: list) -> list:
    """One rich Table per (op, preset, dtype, routing, backward, CUDA graph or not)."""
    tables = []
    for (op, preset, scale, dtype, routing, backward, cuda_graph), rows in _groups(records).items():
        first = rows[0]
        shape = (f"E={first['num_experts']} k={first['top_k']} H={first['hidden_size']} "
                 f"I={first['intermediate_size']}")
        what = f"{op} {'forward+backward' if backward else 'forward'}{' (CUDA graph replays)' if cuda_graph else ''}"
        label = preset if scale == 1.0 else f"{preset} at scale {scale:g}"
        table = Table(title=f"{label} ({shape}), {what}, {dtype}, {routing} routing", title_justify="left",
                      caption=_skipped(first.get("skipped", {})), caption_justify="left")
        for column in ("backend", "tokens", "median ms", "tokens/s", "TFLOP/s", "GB/s", "roofline"):
            table.add_column(column, justify="left" if column == "backend" else "right")
        peers = list(dict.fromkeys(name for r in rows for name in r["peers"]))
        for name in peers:
            table.add_column(f"vs {name}", justify="right")
        for r in sorted(rows, key=lambda r: (r["tokens"], r["backend"])):
            cells = [r["backend"], str(r["tokens"]), _num(r["ms"]), _num(r["tokens_per_s"]), _num(r["tflops"]),
                     _num(r["gbps"]), f"{100 * r['roofline']:.0f}% {r['bound'][:3]}"]
            cells += [_speedup(r["speedup"].get(name)) for name in peers]
            table.add_row(*cells)
        tables.append(table)
    return tables


def _skipped(skipped: dict) -> Optional[str]:
    """The peers left out and why, those with one reason together."""
    by_reason: dict = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"skipped {', '.join(names)}: {why}" for why, names in by_reason.items()) or None


PEER_NOTE = ("vs X: X's median time / this backend's (above 1 = faster than X); vs bound: the time the "
             "distinct experts' bytes (a layer's: with its router's and shared experts') take at the measured "
             "bandwidth. ")
ROOFLINE_NOTE = ("roofline: the least time this work can take here (max of bytes / bandwidth and FLOPs / "
                 "matmul peak) over the measured time, mem(ory) or com(pute) bound.")


def print_tables(records: list, console: Optional[Console] = None) -> None:
    console = console or Console()
    for table in bench_tables(records):
        console.print(table)
    if records:  # the "vs" columns' note only where a table has them
        console.print((PEER_NOTE if any(r["peers"] for r in records) else "") + ROOFLINE_NOTE, style="dim")


def print_stages(out: Console, preset, tokens: int, backend: str, dtype: str, routing: str, backward: bool,
                 rows: list, fused_ms: float) -> None:
    """The profile of one batch: a table of its stages, then their sum beside the fused moe_mlp."""
    out.print(f"\n{preset.describe()}")
    table = Table(title=f"T={tokens}, {backend}, {dtype}, {routing} routing", title_justify="left")
    columns = ["stage", "fwd ms", "share", "GB/s", "TFLOP/s", "roofline"]
    if backward:
        columns += ["bwd ms", "bwd share"]
    for c in columns:
        table.add_column(c, justify="left" if c == "stage" else "right")
    for r in rows:
        cells = [r["stage"], f"{r['forward_ms']:.3f}", f"{100 * r['share']:.0f}%", f"{r['gbps']:.3g}",
                 f"{r['tflops']:.3g}", f"{100 * r['roofline']:.0f}% {r['bound'][:3]}"]
        if backward:
            bwd = r["backward_ms"]
            cells += ["-" if bwd is None else f"{bwd:.3f}",
                      "-" if r["backward_share"] is None else f"{100 * r['backward_share']:.0f}%"]
        table.add_row(*cells)
    routed = [r for r in rows if r["stage"] not in ("route", "shared experts")]
    total = sum(r["forward_ms"] for r in routed) + (sum(r["backward_ms"] or 0 for r in routed) if backward else 0)
    out.print(table)
    what = "forward+backward" if backward else "forward"
    out.print(f"plan..combine stages sum to {total:.3f} ms; the fused moe_mlp {what} with the same plan takes "
              f"{fused_ms:.3f} ms")


def plot(records: Iterable[dict], path: str) -> None:
    """Time against tokens, log-log, one panel per preset, one line per backend and peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(list(records))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4.2), squeeze=False)
    for ax, ((op, preset, scale, dtype, routing, backward, cuda_graph), rows) in zip(axes[0], groups.items()):
        lines: dict = {}
        for r in rows:
            lines.setdefault(r["backend"], {})[r["tokens"]] = r["ms"]
            for name, ms in r["peers"].items():
                if ms is not None:
                    lines.setdefault(name, {})[r["tokens"]] = ms
        for name, points in lines.items():
            xs = sorted(points)
            style = "--" if name == "bound" else "-"
            ax.plot(xs, [points[x] for x in xs], style, marker="o", markersize=3, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("median ms")
        label = preset if scale == 1.0 else f"{preset} x{scale:g}"
        graphs = ", CUDA graphs" if cuda_graph else ""
        ax.set_title(f"{label} {op}{' fwd+bwd' if backward else ''}\n{dtype}, {routing}{graphs}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
