"""Per-phase graph configuration: how each runner captures and runs.

``DecodeConfig`` and ``PrefillConfig`` hold one phase each; ``GraphConfig`` (in ``runners.graph_config``)
holds both and builds them from a dict, JSON or server flags. Everything that can be checked without a
device is checked here, when the config is built; ``check_device`` adds what depends on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import hal
from runners.config_fields import check_field_types, plain as _plain
from runners.buckets import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    check_buckets,
    default_decode_buckets,
    default_prefill_buckets,
)

GraphMode = hal.GraphMode
Compiler = hal.Compiler

# How the forward is compiled before graphhal captures it, per mode. "none": the forward as written.
# "eager"/"inductor" in piecewise: how each piece between splitting ops is compiled (torch.compile always
# traces a piecewise forward, to split it). "inductor" in full/breakable: the forward compiled once, with a
# dynamic batch dimension and without Inductor's own CUDA graphs, then captured per bucket by graphhal. A
# mode a device plugin adds takes "none". Mode auto is resolved before capturing, from what the ops in the
# forward declare (``runners.mode_choice``).
COMPILERS_BY_MODE = {
    GraphMode.FULL: (Compiler.NONE, Compiler.INDUCTOR),
    GraphMode.BREAKABLE: (Compiler.NONE, Compiler.INDUCTOR),
    GraphMode.PIECEWISE: (Compiler.EAGER, Compiler.INDUCTOR),
    GraphMode.DISABLED: (Compiler.NONE,),
    GraphMode.AUTO: (Compiler.NONE, Compiler.INDUCTOR),  # "none" becomes "eager" where auto picks piecewise
}
ADDRESS_CHECKS = ("every_replay", "first_replay")


@dataclass
class PhaseConfig:
    """Fields every phase has. Use ``DecodeConfig`` or ``PrefillConfig``.

    mode:            ``"auto"`` (the default): the runner picks, before capturing, ``full`` where every op in
                     the forward allows it and ``piecewise`` (or ``breakable``) otherwise, and logs why
                     (``runners.mode_choice``). Or a graph mode the device offers (``hal.GraphMode`` or a mode
                     a device plugin adds), or ``"disabled"`` to run eagerly through the same API (to tell a
                     graph bug from a model bug, or on devices without graphs). Any other name is refused
                     when the config is built; checked against the device by ``check_device``; ``full`` also
                     against the ops the forward reaches.
    buckets:         padded sizes to capture, strictly increasing; the last must equal the phase maximum.
    compiler:        ``none``, ``eager`` or ``inductor`` (``hal.Compiler``; see ``COMPILERS_BY_MODE``); default:
                     ``eager`` for piecewise, ``none`` otherwise.
    eager_fallback:  run batches larger than the maximum eagerly (True) or raise (False).
    warmup_runs:     eager runs per bucket before its capture (lazy init, autotuning and allocator warm-up
                     must not happen inside a capture).
    show_progress:   a progress bar over the buckets while capturing.
    check_addresses: ``every_replay`` (default): before every replay, check that the static inputs and the
                     watched tensors are where the graphs were captured with (a few microseconds per step,
                     measured in docs/bench.md); ``first_replay``: only on each bucket's first replay.
    agreement_timeout_s: with a process group, how long a rank waits for the others at an agreement point
                     (before capturing, after each warm-up and capture, per run with a consensus group)
                     before it fails naming the stage. Generous by default: a first bucket's warm-up may
                     compile kernels for minutes.
    pool_budget_mib: the most graph pool memory this runner may take (MiB; None: no limit). Checked after the
                     largest bucket's capture, before any other (``estimate_pool_bytes``): over budget, the
                     capture stops with ``PoolBudgetError`` giving the estimate and what to change. Size the
                     KV cache with the budget set aside.
    compile_cache_dir: a directory for everything compiled on the way to the graphs (Inductor's and Triton's
                     on-disk caches, and torch's portable cache artifacts: ``runners.compile_cache``), so a
                     restarted server with the same model and config loads instead of compiling. None: torch's
                     defaults (caches under /tmp, no artifacts). An empty string is refused; a directory the
                     process cannot write is logged at capture and left out (torch's own caches are used).
    breakable_debug: in mode ``breakable``, capture the whole forward as one eager step through the same
                     capture and replay path: if results go right this way and wrong with real segments, the
                     bug is in the graph, not the model. Also switched on by GRAPHHAL_BREAKABLE_DEBUG=1 in the
                     environment of the process that captures.
    """

    phase: ClassVar[str] = ""
    size_field: ClassVar[str] = ""  # the field holding the phase maximum (max_bs, max_tokens)

    mode: str = GraphMode.AUTO.value
    buckets: list[int] | None = None
    compiler: str | None = None
    eager_fallback: bool = True
    warmup_runs: int = 1
    show_progress: bool = True
    breakable_debug: bool = False
    check_addresses: str = "every_replay"
    agreement_timeout_s: float = 600.0
    pool_budget_mib: float | None = None
    compile_cache_dir: str | None = None

    def __post_init__(self) -> None:
        # Nothing here asks a device: a mode graphhal does not name is looked up among those the installed
        # plugins declare (no device needs to be present); check_device adds what depends on the device.
        check_field_types(self, _FIELD_TYPES, _OPTIONAL_FIELDS)
        self.mode = _plain(self.mode)
        self._check_mode()
        self._check_compiler()
        self._resolve_buckets()
        if self.warmup_runs < 1:
            raise ValueError(
                f"{self.phase}: warmup_runs must be at least 1 (capture needs a warmed-up forward), got {self.warmup_runs!r}"
            )
        if not (math.isfinite(self.agreement_timeout_s) and self.agreement_timeout_s > 0):
            raise ValueError(
                f"{self.phase}: agreement_timeout_s must be a finite, positive number of seconds, got "
                f"{self.agreement_timeout_s!r}"
            )
        if self.pool_budget_mib is not None and not self.pool_budget_mib > 0:
            raise ValueError(f"{self.phase}: pool_budget_mib must be positive (or null for no limit), got {self.pool_budget_mib!r}")
        if self.compile_cache_dir is not None and not self.compile_cache_dir.strip():
            # Path("") is the working directory: a server started elsewhere would find no cache, or another's.
            raise ValueError(
                f"{self.phase}: compile_cache_dir must name a directory (a path; ~ is expanded), or be null for "
                f"torch's own caches; got {self.compile_cache_dir!r}"
            )
        if self.check_addresses not in ADDRESS_CHECKS:
            raise ValueError(
                f"{self.phase}: check_addresses must be one of {', '.join(ADDRESS_CHECKS)}, got {self.check_addresses!r}"
            )

    @property
    def max_size(self) -> int:
        return getattr(self, self.size_field)

    def _check_mode(self) -> None:
        """ValueError unless ``mode`` is a ``hal.GraphMode`` or a mode a loaded device plugin declares; a mode
        spelled in another case is named as the one meant."""
        if self.mode in COMPILERS_BY_MODE:
            return  # the default registry is asked only for other modes
        allowed = [GraphMode.AUTO.value, *(mode.value for mode in GraphMode.device_modes())]
        allowed += sorted(hal.default_registry().declared_graph_modes() - set(allowed))
        if self.mode in allowed:
            return
        meant = next((mode for mode in allowed if mode.lower() == self.mode.lower()), None)
        hint = f" (did you mean {meant!r}?)" if meant is not None else ""
        raise ValueError(
            f"{self.phase}: unknown graph mode {self.mode!r}{hint}; modes: {', '.join(allowed)} (graphhal's own, "
            "and those the device plugins installed here declare)"
        )

    def _check_compiler(self) -> None:
        allowed = COMPILERS_BY_MODE.get(self.mode, (Compiler.NONE,))
        if self.compiler is None:
            self.compiler = allowed[0].value
        self.compiler = _plain(self.compiler)
        if self.compiler not in allowed:
            raise ValueError(
                f"{self.phase}: compiler {self.compiler!r} does not go with mode {self.mode!r}; "
                f"mode {self.mode!r} takes: {', '.join(allowed)}"
            )

    def _resolve_buckets(self) -> None:
        name = self.size_field
        maximum = getattr(self, name)
        if maximum is not None and (not isinstance(maximum, int) or isinstance(maximum, bool) or maximum < 1):
            raise ValueError(f"{self.phase}: {name} must be a positive integer, got {maximum!r}")
        if self.buckets is not None:
            self.buckets = check_buckets(self.buckets, f"{self.phase} buckets")
            if maximum is None:
                setattr(self, name, self.buckets[-1])
            elif self.buckets[-1] != maximum:
                raise ValueError(
                    f"{self.phase}: the largest bucket ({self.buckets[-1]}) must equal {name} ({maximum}): every "
                    f"size up to {name} needs a bucket, and none may exceed it"
                )
        else:
            if maximum is None:
                setattr(self, name, self.default_max_size())
            self.buckets = self.default_buckets(getattr(self, name))

    def default_max_size(self) -> int:
        raise NotImplementedError

    def default_buckets(self, maximum: int) -> list[int]:
        raise NotImplementedError

    def check_device(self, device: "hal.Device") -> None:
        """Raise when ``device`` cannot run this config: a mode it does not offer, or a mode and compiler it
        cannot capture together (``Device.compiled_capture_problem``). Mode ``auto`` is asked about its
        compiler now, and checked again when it has picked its mode."""
        if self.mode not in (GraphMode.AUTO, *device.modes):
            if self.mode in GraphMode.device_modes():
                problem = f"device {device} does not offer graph mode {self.mode!r}"
            else:  # a mode of a plugin serving another device type
                problem = f"unknown graph mode {self.mode!r} on device {device}"
            raise hal.UnsupportedModeError(f"{self.phase}: {problem}; supported modes: {', '.join(device.modes)}")
        if self.mode != GraphMode.DISABLED and self.compiler is not None:
            problem = device.compiled_capture_problem(self.mode, self.compiler)
            if problem is not None:
                raise hal.UnsupportedModeError(
                    f"{self.phase}: device {device} cannot capture mode {self.mode!r} with compiler {self.compiler!r}: "
                    f"{problem}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class DecodeConfig(PhaseConfig):
    """How a ``DecodeRunner`` captures and runs; ``max_bs`` is the largest batch run on a graph.

    Default buckets: ``default_decode_buckets(max_bs)``; default ``max_bs``: the largest bucket, or 256.

    query_tokens: the new tokens every request carries in a step, ``q = 1 + k`` for a speculative verify step
                  over ``k`` draft tokens (default 1: plain decode). A runner row is one request either way:
                  its per-token slots (``InputSlot(per_token=True)``) have ``q`` first in their row shape,
                  buckets and ``max_bs`` count requests, and padding adds whole requests only. Runners at
                  several ``q`` share one graph pool through ``pool=``.
    """

    phase: ClassVar[str] = "decode"
    size_field: ClassVar[str] = "max_bs"

    max_bs: int | None = None
    query_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_tokens < 1:
            raise ValueError(
                f"decode: query_tokens must be at least 1 (1 + the draft tokens each request verifies), got {self.query_tokens!r}"
            )

    def default_max_size(self) -> int:
        return DEFAULT_MAX_BATCH_SIZE

    def default_buckets(self, maximum: int) -> list[int]:
        return default_decode_buckets(maximum)


DEFAULT_MAX_REQUESTS = 64


@dataclass
class PrefillConfig(PhaseConfig):
    """How a ``PrefillRunner`` captures and runs.

    max_tokens:   the largest packed token count run on graphs (default: the largest bucket, or 4096).
    max_requests: the most requests one packed batch may hold; per-request inputs are padded to it.
    Mode ``full`` captures the whole step per token bucket: only for forwards whose ops all allow capture in
    mixed batches (attention reading its lengths from device memory); the runner checks before capturing.
    """

    phase: ClassVar[str] = "prefill"
    size_field: ClassVar[str] = "max_tokens"

    max_tokens: int | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_requests, int) or isinstance(self.max_requests, bool) or self.max_requests < 1:
            raise ValueError(f"prefill: max_requests must be a positive integer, got {self.max_requests!r}")

    def default_max_size(self) -> int:
        return DEFAULT_MAX_TOKENS

    def default_buckets(self, maximum: int) -> list[int]:
        return default_prefill_buckets(maximum)


# The type every field must have (None allowed for the optional ones): checked before anything else.
_FIELD_TYPES: dict[str, type] = {
    "mode": str,
    "buckets": list,
    "compiler": str,
    "eager_fallback": bool,
    "warmup_runs": int,
    "show_progress": bool,
    "breakable_debug": bool,
    "check_addresses": str,
    "agreement_timeout_s": float,
    "pool_budget_mib": float,
    "compile_cache_dir": str,
    "max_bs": int,
    "query_tokens": int,
    "max_tokens": int,
    "max_requests": int,
}
_OPTIONAL_FIELDS = frozenset({"buckets", "compiler", "max_bs", "max_tokens", "pool_budget_mib", "compile_cache_dir"})

