"""The child of ``graphhal.bench.setup.restart``: one fresh process setting up every decode bucket, then reporting.

    python -m graphhal.bench.setup.fresh_process --setup full+inductor --cache-dir DIR --device cuda:0 ...

Prints one JSON line: the setup's seconds, Dynamo's compile count and the bucket count. Kept apart from
``restart`` so that running it imports nothing of the bench it does not need.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import torch

from graphhal.bench.names import FULL_INDUCTOR, REDUCE_OVERHEAD

if TYPE_CHECKING:
    from graphhal.bench.workload import Workload
    from runners.compile_cache import CompileCache

# Not a setup of graphs: the forward full+inductor stored, loaded and called once at the largest bucket, with
# no runner. A restart of that compile cannot take less (torch's imports, device libraries, kernel loads).
STORED_FORWARD_ALONE = "stored forward alone"


def set_up(argv: list[str]) -> dict:
    """In the fresh process: build the model, set up ``--setup`` over every bucket, report."""
    parser = argparse.ArgumentParser()
    for flag in ("--setup", "--cache-dir", "--device", "--dtype", "--model"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--max-bs", type=int, required=True)
    parser.add_argument("--context-len", type=int, required=True)
    args = parser.parse_args(argv)

    import hal
    from graphhal.bench.contenders.reduce_overhead import (
        compile_reduce_overhead,
        mark_for_reduce_overhead,
        recompile_limit_at_least,
        reduce_overhead_setup_calls,
    )
    from graphhal.bench.contenders.static_buffers import padded_inputs
    from graphhal.bench.setup.setup_meter import metered_setup
    from graphhal.bench.workload import build_reference_workload
    from graphhal.refmodel import ModelConfig
    from runners import DecodeConfig, DecodeRunner
    from runners.compile_cache import CompileCache

    device = hal.get_device(args.device)
    cache = CompileCache(args.cache_dir)
    cache.activate()  # every setup the same caches: before anything compiles
    workload = build_reference_workload(
        device, ModelConfig(**json.loads(args.model)), getattr(torch, args.dtype), max_batch_size=args.max_bs, context_len=args.context_len
    )
    buckets = sorted(DecodeConfig(max_bs=args.max_bs).buckets or [], reverse=True)
    with metered_setup(device) as meter:
        if args.setup == STORED_FORWARD_ALONE:
            _call_stored_forward(cache, workload, max(buckets))
        elif args.setup == REDUCE_OVERHEAD:
            with recompile_limit_at_least(len(buckets) + 1):
                compiled = compile_reduce_overhead(workload.decode_step, True)
                statics = []  # every size's buffers stay alive, as in a server
                for size in buckets:
                    static = padded_inputs(workload, size)
                    mark_for_reduce_overhead(workload, static, dynamic_batch=True)
                    reduce_overhead_setup_calls(compiled, static, device.torch_device)
                    statics.append(static)
            cache.save()
        else:
            compiler = hal.Compiler.INDUCTOR if args.setup == FULL_INDUCTOR else hal.Compiler.NONE
            config = DecodeConfig(mode=hal.GraphMode.FULL, compiler=compiler, max_bs=args.max_bs, show_progress=False, compile_cache_dir=args.cache_dir)
            DecodeRunner(workload.decode_step, workload.decode_slots, device, config).capture()  # saves the artifacts
    return {"setup_s": meter.setup_s, "compiles": meter.compiles, "num_buckets": len(buckets)}


def _call_stored_forward(cache: CompileCache, workload: Workload, size: int) -> None:
    """Load the one forward full+inductor stored in ``cache`` and call it once at ``size`` rows, as a runner's
    first warm-up does (inputs all padding, no grad)."""
    from graphhal.bench.contenders.static_buffers import padded_inputs

    folder = cache.forwards.directory
    stored = sorted(folder.glob("forward-*.bin"))
    if len(stored) != 1:
        raise RuntimeError(f"expected the one forward full+inductor stored in {folder}, found {len(stored)}")
    with stored[0].open("rb") as file:
        forward = torch.compiler.load_compiled_function(file)
    with torch.no_grad():
        forward(workload.decode_step, **padded_inputs(workload, size))


if __name__ == "__main__":
    print(json.dumps(set_up(sys.argv[1:])))
