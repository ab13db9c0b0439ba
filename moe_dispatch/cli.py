"""The `moe-dispatch` command."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, available_backends
    from .backends import BACKEND_NAMES, unavailable_reason

    print(f"moe-dispatch {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    for module in ("torch", "triton", "numba", "numpy"):
        print(f"{module:8s} {_version(module)}")
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    print(f"cpu      {torch.get_num_threads()} threads")
    for d in devices[1:]:
        print(f"{str(d):8s} {torch.cuda.get_device_name(d)}")
    print(f"backends available: {', '.join(available_backends())}")
    for name in BACKEND_NAMES:
        for d in devices[:2]:
            reason = unavailable_reason(name, d)
            print(f"  {name:7s} on {d.type:4s}: {'ok' if reason is None else reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-dispatch", description="Fast Mixture-of-Experts dispatch.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and the backends available here")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
