"""Entry point of the ``graphhal`` command."""

from __future__ import annotations

import argparse
import sys

import hal
from graphhal.bench.render.plot import PlotUnavailableError
from graphhal.cli import bench, demo, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphhal", description="Device graphs for LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    info.add_arguments(
        commands.add_parser("info", help="devices, their modes, plugins that failed to load, versions, GPUs")
    )
    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="compare eager, graphhal's modes, a hand-written graph floor and torch.compile on the reference model",
        )
    )
    demo.add_arguments(
        commands.add_parser("demo", help="capture the reference decoder and compare graph and eager step times")
    )
    args = parser.parse_args(argv)
    run = {"info": info.run, "bench": bench.run, "demo": demo.run}[args.command]
    try:
        return run(args)
    except (hal.GraphHalError, ValueError, PlotUnavailableError) as exc:
        # A bad device name, an unavailable device, a model that does not fit: say it in one line.
        print(f"graphhal {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
