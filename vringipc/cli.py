"""The ``vringipc`` command (also ``python -m vringipc``)."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vringipc",
        description="vringipc: inter-process messaging over a virtio split ring in shared memory.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    d = sub.add_parser("demo", help="move messages between two processes and print the figures "
                                    "beside an os.pipe baseline measured in the same run")
    d.add_argument("--quick", action="store_true", help="a few seconds instead of ~15")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from vringipc import demo
        return demo.main(quick=args.quick)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
