"""graphhal's measuring harness: the reference model through graphhal's runners vs eager, a floor and torch.compile.

One run flows one way: plan -> lineup -> workload -> timed sizes -> setup measurements -> result -> render.

    plan            what to measure (``BenchPlan``) and the device's defaults for what a caller leaves open
    lineup          what runs on this device and what is skipped, and why, settled before anything runs
    workload        the model, KV cache and requests every contender shares (``Workload``: where a model plugs in)
    contenders/     everything timed against eager, keyed by name: eager, runner modes, floor, reduce-overhead
    measurements    one size (set up, checked against eager, timed together) or one setup measurement at a
                    time, each apart: the one place memory is released
    timing          the timing primitive: device clock, median of enough repeats
    agreement       each contender's output checked against eager's
    setup/          what a server pays at startup: capture cost, compiled setups, prefill setups
    results         what a run found, as plain dataclasses
    render/         the result as a terminal table, a JSON file and a plot
    run             the run, start to end
    names           the phase and contender names results are keyed by

``graphhal bench`` (graphhal.cli/bench.py) is its command line: it parses, builds the plan, runs, prints.
"""

from graphhal.bench.contenders import DECODE_CONTENDERS, PREFILL_MODES
from graphhal.bench.plan import DEFAULT_STATIC_SIZES, MODELS, BenchPlan, PlanDefaults, PrefillShape, prefill_shapes
from graphhal.bench.results import BenchResult
from graphhal.bench.run import run_bench
from graphhal.bench.timing import TimerSettings

__all__ = [
    "DECODE_CONTENDERS",
    "DEFAULT_STATIC_SIZES",
    "MODELS",
    "PREFILL_MODES",
    "BenchPlan",
    "BenchResult",
    "PlanDefaults",
    "PrefillShape",
    "TimerSettings",
    "prefill_shapes",
    "run_bench",
]
