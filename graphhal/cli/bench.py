"""``graphhal bench``: compare eager, graphhal's modes, a hand-written floor and torch.compile in one run.

The command line of the harness in ``graphhal.bench``: it parses the options into a ``BenchPlan`` (what the
options leave open comes from ``PlanDefaults``: small on CPU, a server's view on a GPU), runs it, and prints
the table, writing the JSON file and the plot where asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path
from typing import Any

from graphhal.bench import (
    DECODE_CONTENDERS,
    DEFAULT_STATIC_SIZES,
    MODELS,
    PREFILL_MODES,
    BenchPlan,
    PlanDefaults,
    TimerSettings,
    prefill_shapes,
    run_bench,
)
from graphhal.bench.contenders.registry import TRANSFORMERS_BASELINES
from graphhal.bench.names import FLOOR, REDUCE_OVERHEAD
from graphhal.bench.transformers_families import TRANSFORMERS_FAMILIES, transformers_cache_shape
from hal import GraphMode
from graphhal.bench import all_reduce_sizes
from graphhal.bench.render import json_file, plot, table, tensor_parallel_summary
from graphhal.bench.tensor_parallel import run_bench_on_ranks
from graphhal.cli.shared_options import DTYPES, chosen_device


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _name_list(known: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        return names

    return parse


# The setup measurements a run adds when asked (--setup): each takes minutes on a GPU, so none is in the
# default run, whose step-time tables print within two minutes there.
SETUP_SECTIONS = {
    "compiled": "full+inductor against reduce-overhead, every decode bucket up to --capture-max-bs (CUDA only)",
    "restart": "full, full+inductor and reduce-overhead in fresh processes, cold then warm over one compile cache "
    "directory (CUDA only)",
    "prefill": "piecewise and breakable prefill runners for every bucket up to --prefill-setup-max-tokens",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="device name (cuda:0, cpu, ...); default: the best one present")
    parser.add_argument(
        "--model",
        choices=[*sorted(MODELS), *TRANSFORMERS_FAMILIES],
        help="reference model size, or a transformers family (random weights, 1B-class shapes; tiny on cpu) run "
        "through graphhal.transformers, with transformers' own decode steps as extra baselines (needs "
        "transformers); default: tiny on cpu, default elsewhere",
    )
    parser.add_argument("--layers", type=int, help="override the model's number of decoder layers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 elsewhere")
    parser.add_argument("--batch-sizes", type=_int_list, help="decode batch sizes; default: 1,4,16 on cpu, 1,4,16,64,256 elsewhere")
    parser.add_argument("--context-len", type=int, help="longest cached context per decode request; default: 32 on cpu, 512 elsewhere")
    parser.add_argument(
        "--modes",
        type=_name_list((*DECODE_CONTENDERS, *TRANSFORMERS_BASELINES)),
        help=f"decode contenders besides eager, from {', '.join(DECODE_CONTENDERS)}; with a transformers --model "
        f"also {', '.join(TRANSFORMERS_BASELINES)}; default: all (those the device cannot run, like "
        f"{REDUCE_OVERHEAD} off CUDA, are listed as skipped)",
    )
    parser.add_argument(
        "--prefill-modes", type=_name_list(PREFILL_MODES), default=list(PREFILL_MODES),
        help=f"prefill runner modes, from {', '.join(PREFILL_MODES)}; default: all",
    )
    parser.add_argument("--tokens", type=_int_list, help="prefill token counts; default: 16,64 on cpu, 16,64,256,1024 elsewhere")
    parser.add_argument("--requests", type=_int_list, default=[1, 4], help="prefill request counts per token count; default: 1,4")
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill benchmark (timings and setup)")
    parser.add_argument("--capture-max-bs", type=int, default=256, help="largest bucket of the capture-only benchmark; default: 256")
    parser.add_argument(
        "--no-capture-cost", action="store_true",
        help="skip every capture-only measurement (bucket capture, one break, and any --setup)",
    )
    parser.add_argument(
        "--static-sizes", type=_int_list, default=list(DEFAULT_STATIC_SIZES),
        help="batch sizes the dynamic=False reduce-overhead setup compiles, one compile each; its time for every "
        f"bucket is extrapolated from them; default: {','.join(map(str, DEFAULT_STATIC_SIZES))}",
    )
    parser.add_argument(
        "--setup", type=_name_list((*SETUP_SECTIONS, "all")), default=[], metavar="NAMES",
        help="the long setup measurements to add, comma-separated: " + "; ".join(f"{name}: {what}" for name, what in SETUP_SECTIONS.items())
        + "; or all. None by default: on a GPU they take minutes, and the step-time tables come first",
    )
    parser.add_argument(
        "--prefill-setup-max-tokens", type=_positive_int,
        help="largest prefill bucket of the prefill setup; default: 4096 (PrefillConfig's) on accelerators, the "
        "model's max_seq_len on cpu; capped where max_requests requests of max_seq_len tokens hold fewer",
    )
    parser.add_argument("--target-error", type=float, default=0.01, help="repeat until the median's standard error is under this fraction; default: 0.01")
    parser.add_argument("--min-repeats", type=int, default=5, help="fewest timing repeats per measurement; default: 5")
    parser.add_argument("--max-repeats", type=int, default=50, help="most timing repeats per measurement; default: 50")
    parser.add_argument("--time-budget", type=float, help="seconds per measurement after which it stops at min-repeats; default: 1 on cpu, 3 elsewhere")
    parser.add_argument(
        "--threads", type=int,
        help="torch intra-op threads on cpu; default: 1 (the tiny model's ops gain nothing from more, and a "
        "parallel op stalls whenever another process holds one of its threads' cores)",
    )
    parser.add_argument(
        "--tp", type=_positive_int, default=1,
        help="tensor-parallel ranks: spawns one process per rank (one GPU each; gloo on cpu), the model sharded "
        "over them, every rank measuring in lockstep, rank 0 reporting: with torch.distributed for every "
        "all-reduce, and again with the device's own where it has one; one all-reduce per message size by path; "
        "then the same model at TP=1 for the speed-up, and each step's all-reduce share. Default model with --tp: "
        "large; decode only",
    )
    parser.add_argument(
        "--generation", action="store_true",
        help="instead: the generation loop's throughput, synchronous against overlapped, greedy against sampled, "
        "beside the runner's step and transformers' generate (graphhal.bench.generation; a 1B-shaped Llama)",
    )
    parser.add_argument(
        "--spec", action="store_true",
        help="instead: speculative decoding's machinery on the llama family (graphhal.bench.speculative): the verify "
        "step at q = 1 + k against the plain decode step, a draft model's step, the loop's tokens per second at a "
        "set acceptance (replay drafter) against the ideal from the step costs, prompt lookup against transformers' "
        "(--dtype and --batch-sizes apply)",
    )
    parser.add_argument(
        "--observe", action="store_true",
        help="instead: what a server sees of its graphs (graphhal.bench.observe): counters' cost on against off, "
        "runner.stats(), device-wide memory per bucket, the memory plan against the capture, the prefill pool "
        "with last-token logits",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also plot step time and speedup vs batch size to a PNG (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def plan_from_arguments(args: argparse.Namespace, rank: int | None = None) -> BenchPlan:
    """The plan the options describe; ``rank``: for that rank of a tensor-parallel run (its own GPU)."""
    device = chosen_device(args.device) if rank is None else _rank_device(args.device, rank)
    defaults = PlanDefaults(device)
    family = args.model if args.model in TRANSFORMERS_FAMILIES else None
    if family is not None:
        if args.tp > 1:
            raise SystemExit("graphhal bench: --tp runs the reference model only, not a transformers family")
        config = transformers_cache_shape(family, tiny=device.type == "cpu", num_layers=args.layers)
    else:
        config = MODELS[args.model or ("large" if args.tp > 1 else defaults.model)]()
    if args.layers is not None:
        config = dataclasses.replace(config, num_layers=args.layers)
    setups = set(SETUP_SECTIONS) if "all" in args.setup else set(args.setup)
    return BenchPlan(
        device=device,
        config=config,
        dtype=DTYPES[args.dtype] if args.dtype else defaults.dtype,
        context_len=args.context_len or defaults.context_len,
        batch_sizes=args.batch_sizes or defaults.batch_sizes,
        decode_modes=args.modes,
        prefill_modes=[] if args.no_prefill else args.prefill_modes,
        prefill_shapes=[] if args.no_prefill else [*prefill_shapes(args.tokens or defaults.tokens, args.requests), defaults.mixed],
        capture_max_bs=None if args.no_capture_cost else args.capture_max_bs,
        compiled_setups="compiled" in setups and not args.no_capture_cost,
        # Fresh processes with one compile cache, cold then warm, off the cpu (reduce-overhead and
        # Inductor-captured graphs are CUDA's). The reference model only: the processes rebuild it from its config.
        restart_setups="restart" in setups and not args.no_capture_cost and device.type != "cpu" and family is None,
        static_sizes=args.static_sizes,
        prefill_setup_max_tokens=(
            args.prefill_setup_max_tokens or defaults.prefill_setup_max_tokens(config)
            if "prefill" in setups and not args.no_prefill and not args.no_capture_cost
            else None
        ),
        timer=TimerSettings(
            target_rel_error=args.target_error,
            min_repeats=args.min_repeats,
            max_repeats=args.max_repeats,
            budget_s=args.time_budget if args.time_budget is not None else defaults.budget_s,
            min_sample_s=defaults.min_sample_s,
        ),
        cpu_threads=args.threads or 1,
        show_progress=not args.no_progress,
        transformers_family=family,
    )


def _rank_device(name: str | None, rank: int) -> Any:
    """Rank ``rank``'s device: its own GPU (``cuda:<rank>``) where the run is on GPUs, else the cpu."""
    device_type = chosen_device(name).type
    return chosen_device(f"{device_type}:{rank}" if device_type != "cpu" else "cpu")


def _tensor_parallel_plan(args: argparse.Namespace, rank: int) -> BenchPlan:
    # Decode only, and no torch.compile reduce-overhead or compiled setups: the tensor-parallel run measures
    # graphhal's modes against eager and the floor, every rank in lockstep.
    plan = plan_from_arguments(args, rank)
    modes = [m for m in (plan.decode_modes or DECODE_CONTENDERS) if m != REDUCE_OVERHEAD]
    return dataclasses.replace(
        plan, decode_modes=modes, prefill_modes=[], prefill_shapes=[], compiled_setups=False, restart_setups=False,
        prefill_setup_max_tokens=None,
    )


def run(args: argparse.Namespace) -> int:
    _refuse_mixed_benches(args)
    if args.plot is not None:  # fail before minutes of measuring, not after
        plot.require_matplotlib()
    if args.tp > 1:
        return _run_tensor_parallel(args)
    if args.spec:
        if args.model not in (None, "llama"):
            raise SystemExit(f"graphhal bench --spec runs the llama family (--model llama), not {args.model!r}")
        from graphhal.bench import speculative

        dtype = DTYPES[args.dtype] if args.dtype else None
        print(speculative.render(speculative.run(str(chosen_device(args.device)), args.batch_sizes, dtype=dtype)))
        return 0
    if args.observe:
        from graphhal.bench import observe

        print(observe.render(observe.run(str(chosen_device(args.device)), args.batch_sizes)))
        return 0
    if args.generation:
        from graphhal.bench import generation

        device = chosen_device(args.device)
        print(generation.render(generation.run(str(device), args.batch_sizes), device))
        return 0
    # The step-time tables as soon as they are measured; capture and setup costs after them.
    result = run_bench(plan_from_arguments(args), on_step_tables=_print_step_table_part)
    print(table.render_after_step_tables(result))
    left_out = [name for name in SETUP_SECTIONS if name not in args.setup and "all" not in args.setup]
    if left_out and not args.no_capture_cost:
        print(f"\nnot measured: the {', '.join(left_out)} setup(s); add --setup {','.join(left_out)} (minutes on a GPU)")
    if args.json is not None:
        json_file.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot.write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    if result.failed:
        print(f"graphhal bench: {len(result.failed)} measurement(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0


def _print_step_table_part(result: Any, part: str) -> None:
    """Print a part of the step tables the moment the run has it (``run_bench``'s ``on_step_tables``)."""
    text = table.render_step_table_part(result, part)
    if text:
        print(text, flush=True)


def _run_tensor_parallel(args: argparse.Namespace) -> int:
    run = run_bench_on_ranks(partial(_tensor_parallel_plan, args), args.tp)
    result = run.by_path["torch.distributed"]
    device = run.by_path.get("device")
    print(f"tensor parallel: {args.tp} ranks (rank 0 reports; every rank ran the same steps)")
    print(f"the device's own all-reduce: {run.device_all_reduce}")
    for path, measured in run.by_path.items():
        print(f"\nTP={args.tp}, every all-reduce through {'torch.distributed' if path == 'torch.distributed' else 'the device'}:")
        print(table.render(measured))
    # The same model on one device, for the speed-up: eager, the floor and full.
    single = run_bench(
        dataclasses.replace(_tensor_parallel_plan(args, 0), decode_modes=[FLOOR, GraphMode.FULL.value], capture_max_bs=None)
    )
    print("\nthe same model on one device (TP=1):")
    print(table.render(single))
    print("\n" + all_reduce_sizes.render(run.all_reduce, args.tp, single.header.dtype, single.header.device.split(":")[0]))
    print(tensor_parallel_summary.render(args.tp, single, result, device, run.all_reduce))
    if args.json is not None:
        json_file.write_json(result, args.json)
        json_file.write_json(single, args.json.with_name(args.json.stem + "-tp1" + args.json.suffix))
        if device is not None:
            json_file.write_json(device, args.json.with_name(args.json.stem + "-device-all-reduce" + args.json.suffix))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot.write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 1 if result.failed or single.failed or (device is not None and device.failed) else 0


def _refuse_mixed_benches(args: argparse.Namespace) -> None:
    """--generation, --spec and --observe each run a bench of their own instead of the main one: one at a time,
    and without the main bench's --tp, --json and --plot, which they would otherwise silently drop."""
    chosen = [f"--{name}" for name in ("generation", "spec", "observe") if getattr(args, name)]
    if not chosen:
        return
    if len(chosen) > 1:
        raise SystemExit(f"graphhal bench: {' and '.join(chosen)} are benches of their own; run one at a time")
    ignored = [flag for flag, given in (("--tp", args.tp > 1), ("--json", args.json is not None), ("--plot", args.plot is not None)) if given]
    if ignored:
        raise SystemExit(f"graphhal bench {chosen[0]} takes no {', '.join(ignored)} (those belong to the main bench)")

