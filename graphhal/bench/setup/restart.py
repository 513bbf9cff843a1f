"""Setup in a fresh process, cold and after a restart: what a server pays before its first token, twice.

For each setup (``full`` with no compiler, ``full+inductor``, ``reduce-overhead``) two fresh Python processes
in turn set up the decode graphs of every default bucket up to ``max_bs`` over the same compile cache
directory (``runners.compile_cache``: Inductor's and Triton's on-disk caches, and torch's portable cache
artifacts, loaded before and saved after; and Python's bytecode cache where the install keeps none): the
first starts from an empty directory (cold), the second finds what the first compiled (a warm restart). Every
setup gets the same caches, so reduce-overhead is compared fairly: it loads the artifacts and finds the
on-disk caches as graphhal's runner does.

Each process reports its setup time (model built, then runner built and captured, or the compiled function
set up at every size) and the parent the process's whole wall time (interpreter, imports and model
included); the child is ``graphhal.bench.setup.fresh_process``. After full+inductor's warm restart a third process
loads the forward it stored and calls it once at the largest bucket, with no runner and no graph: what any
restart of that compile pays (torch's imports of Inductor's runtime, the device libraries, the kernels),
against which graphhal's own share of the warm restart shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from graphhal.bench.names import FULL_INDUCTOR, REDUCE_OVERHEAD, SETUP
from graphhal.bench.results import RestartSetup
from graphhal.bench.setup.fresh_process import STORED_FORWARD_ALONE

FULL_NO_COMPILER = "full"
RESTART_SETUPS = (FULL_NO_COMPILER, FULL_INDUCTOR, REDUCE_OVERHEAD)


def runnable(device: object, measurements: object) -> list[str]:
    """The restart setups ``device`` can run; the others are recorded as skipped with the reason."""
    from graphhal.bench.contenders import DECODE_CONTENDERS
    from graphhal.bench.results import Skipped

    names = []
    for name in RESTART_SETUPS:
        reason = DECODE_CONTENDERS[name](device).skip_reason(device)
        if reason is None:
            names.append(name)
        else:
            measurements.result.skipped.append(Skipped(SETUP, f"restart {name}", reason))  # type: ignore[attr-defined]
    return names


def measure_restart(name: str, device: str, config: object, dtype: torch.dtype, max_bs: int, context_len: int) -> RestartSetup:
    """``name`` set up in a cold fresh process, then in a warm one over the same cache directory."""
    with tempfile.TemporaryDirectory(prefix="graphhal-restart-") as cache_dir:
        arguments = [
            "--setup", name, "--cache-dir", cache_dir, "--device", device, "--dtype", str(dtype).removeprefix("torch."),
            "--model", json.dumps(dataclasses.asdict(config)), "--max-bs", str(max_bs), "--context-len", str(context_len),
        ]
        environment = _bytecode_cached(cache_dir)
        cold = _fresh_process(arguments, environment)
        warm = _fresh_process(arguments, environment)
        alone = None
        if name == FULL_INDUCTOR:  # the least that restart can take: its stored forward loaded and called once
            arguments[arguments.index("--setup") + 1] = STORED_FORWARD_ALONE
            alone = _fresh_process(arguments, environment)["setup_s"]
    return RestartSetup(
        setup=name, num_buckets=cold["num_buckets"], cold_setup_s=cold["setup_s"], warm_setup_s=warm["setup_s"],
        cold_process_s=cold["process_s"], warm_process_s=warm["process_s"], cold_compiles=cold["compiles"],
        warm_compiles=warm["compiles"], stored_forward_alone_s=alone,
    )


def _bytecode_cached(cache_dir: str) -> dict[str, str]:
    """The fresh processes' environment: where Python could not keep its bytecode cache (bytecode writing
    off, or a read-only install), one kept in ``cache_dir``. A restarted server finds its .pyc files, and
    torch's lazily imported compiler modules are seconds of source to compile; where the install keeps them
    already, cold and warm both use them."""
    environment = dict(os.environ)
    if environment.get("PYTHONDONTWRITEBYTECODE") or not os.access(os.path.dirname(torch.__file__), os.W_OK):
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
        environment["PYTHONPYCACHEPREFIX"] = os.path.join(cache_dir, "pycache")
    return environment


def _fresh_process(arguments: list[str], environment: dict[str, str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "graphhal.bench.setup.fresh_process", *arguments],
        capture_output=True, text=True, timeout=900, env=environment,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the fresh setup process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["process_s"] = time.perf_counter() - started
    return report
