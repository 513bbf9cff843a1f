"""Mode ``auto``, and the check behind ``full``: what the ops a forward reaches allow (``hal.graph_support``).

Before it captures, a runner in mode ``auto`` or ``full`` runs its forward once eagerly at its largest bucket
and lists the ops it reached that declared how far they can be captured. Then:

- ``full``: every such op must allow capture in this runner's batches (a decode runner's are uniform decode
  batches, or uniform batches of ``q`` tokens per request with ``query_tokens=q``; a prefill runner's mixed
  ones), or the capture is refused naming the ops;
- ``auto``: ``full`` where every op allows it; otherwise ``piecewise`` when every op that does not is a
  splitting op (it runs eagerly between the captured pieces), else ``breakable`` when every such op is reached
  inside a break point (it runs eagerly between segments); else it refuses (``OpNotCapturableError``): every
  mode would capture the op. Always among the modes the device offers (``disabled`` where it has no full
  graphs). The choice and its reason are logged and kept on the runner.

This is vLLM's choice between FULL and PIECEWISE from ``AttentionCGSupport``, made per runner and per device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

import hal
from hal.graph_support import BatchKind, OpNotCapturableError, ReachedOp, blocking, graph_support_of, ops_reached
from hal.op_overloads import op_name
from hal.piecewise import registered_splitting_ops
from runners.config import PhaseConfig

GraphMode = hal.GraphMode
Compiler = hal.Compiler


@dataclass(frozen=True)
class ModeChoice:
    config: PhaseConfig  # the runner's config with the mode (and compiler) it will capture with
    reason: str  # why, in a sentence: logged, and in the capture report


def choose_mode(
    config: PhaseConfig,
    device: "hal.Device",
    batch: BatchKind,
    phase: str,
    forward: Callable[..., Any],
    inputs: dict[str, torch.Tensor],
    bucket: int,
) -> ModeChoice:
    """The config a runner captures with: ``config`` itself unless its mode is ``auto`` or ``full`` (above).

    ``inputs`` are the runner's buffers at ``bucket`` (its largest), all padding. A forward that fails in this
    eager run raises ``hal.CaptureError`` saying it is a model error, before anything was captured.
    """
    if config.mode not in (GraphMode.AUTO, GraphMode.FULL):
        return ModeChoice(config, f"mode {config.mode} as configured")
    try:
        reached = ops_reached(forward, inputs, device.torch_device.type)
    except Exception as exc:
        what = (
            f"the eager run of the {phase} forward at bucket {bucket} on {device}, which mode {config.mode} makes to "
            f"see what the forward's ops allow, failed before any capture (a model error, not a graph error): "
            f"{type(exc).__name__}: {exc}"
        )
        raise hal.CaptureError(what, bucket=bucket, mode=config.mode, device=str(device)) from exc
    blocked = blocking(reached, batch)
    if config.mode == GraphMode.FULL:
        if blocked:
            raise OpNotCapturableError(_refusal(phase, device, batch, blocked))
        return ModeChoice(config, _why_full(reached, batch))
    mode, reason = _auto(device, batch, reached, blocked)
    compiler = config.compiler
    if mode == GraphMode.PIECEWISE and compiler == Compiler.NONE:
        compiler = Compiler.EAGER.value  # piecewise always traces the forward to split it; "none" means "as written"
    if mode == GraphMode.DISABLED:
        compiler = Compiler.NONE.value
    chosen = replace(config, mode=mode, compiler=compiler)
    chosen.check_device(device)
    return ModeChoice(chosen, f"mode auto chose {mode}: {reason}")


def ops_to_split(device: "hal.Device", batch: BatchKind) -> frozenset[torch._ops.OpOverload]:
    """The registered splitting ops a piecewise compile of a runner with ``batch``es must split at.

    An op that declares it can be captured in these batches stays inside its piece: running it eagerly between
    pieces would cost its launch from Python on every step (a Triton decode-attention launch plus the custom
    op's dispatch took ~100 us a layer on an H200 host, 8x the step's graph replays) and buy nothing. Except
    on devices that bake host values into graphs (npu attention lengths): they are refreshed only in graphs
    the runner updates, and a piece is not one of them.
    """
    registered = registered_splitting_ops()
    if device.needs_graph_update:
        return registered
    device_type = device.torch_device.type
    return frozenset(
        op for op in registered
        if not ((support := graph_support_of(op, device_type)) is not None and support.allows(batch))
    )


def _auto(device: "hal.Device", batch: BatchKind, reached: list[ReachedOp], blocked: list[ReachedOp]) -> tuple[str, str]:
    offered = device.modes
    if not blocked:
        if GraphMode.FULL in offered:
            return GraphMode.FULL, _why_full(reached, batch)
        return GraphMode.DISABLED, f"device {device} offers no full graphs, and piecewise and breakable build on them"
    why_not_full = f"{_listed(blocked)} cannot be captured in {batch} batches on {device.torch_device.type}"
    splitting = {op_name(op) for op in registered_splitting_ops()}
    if GraphMode.PIECEWISE in offered and all(op.name in splitting for op in blocked):
        return GraphMode.PIECEWISE, f"{why_not_full}; they are splitting ops, run eagerly between captured pieces"
    if GraphMode.BREAKABLE in offered and all(op.in_break_point for op in blocked):
        return GraphMode.BREAKABLE, f"{why_not_full}; they are reached in break points, run eagerly between captured segments"
    if GraphMode.FULL not in offered:
        return GraphMode.DISABLED, f"{why_not_full}, and the device offers neither piecewise nor breakable graphs"
    stranded = [op for op in blocked if op.name not in splitting and not op.in_break_point]
    raise OpNotCapturableError(
        f"mode auto found no graph mode for this forward on {device}: {why_not_full}, and {_listed(stranded)} is "
        "neither a registered splitting op (piecewise runs those eagerly between pieces) nor reached inside a "
        "break point (breakable runs those eagerly between segments), so every mode would capture it. Register it "
        "with hal.register_splitting_op, call it inside a hal.break_point, or use mode 'disabled'."
    )


def _why_full(reached: list[ReachedOp], batch: BatchKind) -> str:
    if not reached:
        return "no op in the forward declares a limit on capture"
    return f"every declared op allows capture in {batch} batches: {_listed(reached)}"


def _refusal(phase: str, device: "hal.Device", batch: BatchKind, blocked: list[ReachedOp]) -> str:
    return (
        f"{phase}: mode 'full' cannot capture this forward on {device}: {_listed(blocked)} cannot be captured in "
        f"{batch} batches (as declared with hal.declare_graph_support). Use mode 'auto' (picks the best mode the "
        "ops allow), 'piecewise' (splitting ops run eagerly between captured pieces) or 'breakable'."
    )


def _listed(ops: list[ReachedOp]) -> str:
    return ", ".join(op.describe() for op in ops)
