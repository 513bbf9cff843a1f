"""Entry point of the ``graphhal`` command."""

from __future__ import annotations

import argparse
import sys

from graphhal_cli import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphhal", description="Device graphs for LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(
        commands.add_parser("demo", help="capture the reference decoder and compare graph and eager step times")
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
