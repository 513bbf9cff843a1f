"""Mixture-of-experts layers in captured steps: the routing must stay on the device.

transformers computes a MoE layer's experts through one of several implementations, chosen per model
(``config._experts_implementation``, ``model.set_experts_implementation``; ``transformers.integrations.moe``):

- ``eager``: a Python loop over the experts the batch routes to, found with ``nonzero`` on the host;
- ``grouped_mm`` (the default): tokens sorted by expert and one grouped matmul over per-expert row offsets
  computed on the device. Whether the offsets stay there depends on which grouped matmul runs:
  * transformers' own ``grouped_mm_fallback`` op loops over ``offs.tolist()`` on the host. It runs under
    ``torch.compile`` whenever the expert weights are not bfloat16 (Inductor has no grouped matmul for other
    dtypes), and in eager code where torch's grouped matmul is unavailable (``_can_use_grouped_mm``);
  * torch's ``grouped_mm`` has a device-side kernel only for some dtypes and GPUs (bfloat16 on SM90/SM100 in
    torch 2.10 and 2.11); otherwise it too loops over ``offs.cpu()``;
- ``batched_mm``: each routed token gathers its expert's weights and one batched matmul runs; nothing is read
  on the host, at a memory cost that grows with tokens x top_k x one expert's weights (transformers uses it
  for generate()'s decode steps on GPUs).

A host read inside a captured step is taken once, at capture: on CUDA the capture fails on the
synchronisation, and a graph that held it would replay the capture's routing for every batch. So before a
runner is built, the implementation the model is set to is checked for the runner's device, dtype and
compile, and one that would read the routing on the host is refused, saying what to change. The cpu
reference device is exempt for grouped matmuls: there the offsets already are in host memory, and the
recorded graph re-runs the whole op on every replay.
"""

from __future__ import annotations

from typing import Any

import torch

import hal
from runners.config import PhaseConfig

GRAPH_SAFE = "batched_mm"  # transformers' implementation that never reads the routing on the host


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` whose forward transformers dispatches by ``_experts_implementation``
    (the classes decorated with ``use_experts_implementation``, which gives them these attributes)."""
    return [
        module for module in model.modules()
        if all(hasattr(module, name) for name in ("has_gate", "has_bias", "is_transposed")) and hasattr(module, "config")
    ]


def compiles(config: PhaseConfig) -> bool:
    """Whether the runner's forward may be traced by torch.compile: piecewise always is, full and breakable
    with a compiler, and auto may resolve to piecewise."""
    return config.mode in (hal.GraphMode.PIECEWISE, hal.GraphMode.AUTO) or config.compiler not in (None, hal.Compiler.NONE)


def routing_read_on_host(
    implementation: str | None,
    device_type: str,
    dtype: torch.dtype,
    *,
    compiled: bool,
    torch_grouped_mm_usable: bool,
    torch_grouped_mm_syncs: bool,
) -> str | None:
    """Why experts of ``implementation`` with weights of ``dtype`` on ``device_type`` would read the routing on
    the host in a captured step, or None when they would not (or it is not known: a kernel of its own).

    ``torch_grouped_mm_usable``: transformers' eager test (``_can_use_grouped_mm``) picks torch's grouped matmul
    (read only for grouped_mm off the cpu); ``torch_grouped_mm_syncs``: torch's grouped matmul reads its offsets
    on the host here (``grouped_mm_syncs``).
    """
    if implementation in (None, "eager"):
        return "its experts loop over the experts the batch routes to, found on the host (nonzero, then a Python loop)"
    if implementation != "grouped_mm" or device_type == "cpu":
        return None
    if (compiled and dtype != torch.bfloat16) or not torch_grouped_mm_usable:
        under = f"under torch.compile with {dtype} weights" if compiled and dtype != torch.bfloat16 else f"on {device_type}"
        return (
            f"{under} transformers' grouped_mm runs its grouped_mm_fallback op, which loops over the expert offsets "
            "read on the host (offs.tolist())"
        )
    if torch_grouped_mm_syncs:
        return (
            f"torch's grouped_mm has no device-side kernel for {dtype} on this {device_type} device and loops over the "
            "expert offsets copied to the host (offs.cpu())"
        )
    return None


def check_experts_capturable(model: torch.nn.Module, device: "hal.Device", config: PhaseConfig) -> None:
    """``UnsupportedModelError`` when the experts ``model`` is set to would read the routing on the host in the
    steps a runner with ``config`` captures on ``device`` (nothing to check in mode ``disabled``)."""
    from graphhal.transformers.attention import UnsupportedModelError

    if config.mode == hal.GraphMode.DISABLED:
        return
    device_type = device.torch_device.type
    checked: set[tuple[Any, ...]] = set()
    for module in experts_modules(model):
        implementation = getattr(module.config, "_experts_implementation", None)
        weight = _first_expert_weight(module)
        key = (type(module), implementation, None if weight is None else (weight.dtype, tuple(weight.shape)))
        if weight is None or key in checked:
            continue
        checked.add(key)
        usable = syncs = False
        if implementation == "grouped_mm" and device_type != "cpu":
            usable = _torch_grouped_mm_usable(weight)
            syncs = usable and device_type == "cuda" and grouped_mm_syncs(module, weight)
        reason = routing_read_on_host(
            implementation,
            device_type,
            weight.dtype,
            compiled=compiles(config),
            torch_grouped_mm_usable=usable,
            torch_grouped_mm_syncs=syncs,
        )
        if reason is not None:
            raise UnsupportedModelError(refusal(model, module, implementation, reason, config, device, weight.dtype))


def refusal(
    model: torch.nn.Module, module: torch.nn.Module, implementation: str | None, reason: str, config: PhaseConfig,
    device: "hal.Device", dtype: torch.dtype,
) -> str:
    remedies = []
    if implementation == "grouped_mm" and dtype != torch.bfloat16:
        remedies.append("load the model in bfloat16 (torch's grouped_mm runs on the device there on SM90/SM100 GPUs)")
    remedies.append(
        f"switch the experts with model.set_experts_implementation({GRAPH_SAFE!r}) (no host read; its memory grows "
        "with tokens x top_k x one expert's weights, so it suits decode batches more than long prefill chunks)"
    )
    remedies.append("use mode 'disabled'")
    return (
        f"{type(model).__name__}'s experts ({type(module).__name__}, experts_implementation {implementation!r}) would read "
        f"the routing on the host inside a {config.phase} step captured in mode {config.mode!r} on {device}: {reason}. "
        "A graph takes that read once, at capture: the capture fails, or replays the capture's routing for every "
        f"batch. To serve it with graphs, {', '.join(remedies[:-1])}, or {remedies[-1]}."
    )


def grouped_mm_syncs(module: torch.nn.Module, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul, called as transformers calls it on ``module``'s expert weights, reads its
    offsets on the host here: one tiny call (a row per expert) under CUDA's sync debug mode, outside any capture."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        return True
    experts = weight.shape[0]
    # transformers multiplies (tokens, in) by the weight as (experts, in, out): transposed unless stored so.
    grouped = weight if module.is_transposed else weight.transpose(-2, -1)
    rows = torch.zeros(experts, grouped.shape[1], dtype=weight.dtype, device=weight.device)
    offsets = torch.arange(1, experts + 1, dtype=torch.int32, device=weight.device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grouped_mm(rows, grouped, offs=offsets)
    except RuntimeError as exc:
        # Only the sync debug mode's error is an answer; any other failure of this small call is left for the
        # model's own call to report.
        return "synchroniz" in str(exc)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


def _torch_grouped_mm_usable(weight: torch.Tensor) -> bool:
    """transformers' own test for calling torch's grouped matmul (eager code), where it has one."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
    except ImportError:
        return True
    rows = torch.zeros(1, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    offsets = torch.ones(weight.shape[0], dtype=torch.int32, device=weight.device)
    return bool(_can_use_grouped_mm(rows, weight, offsets))


def _first_expert_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The experts' first projection, [experts, out, in] (or [experts, in, out] when transposed)."""
    for name in ("gate_up_proj", "up_proj"):
        weight = getattr(module, name, None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 3:
            return weight
    return None


def implementations(model: torch.nn.Module) -> dict[str, Any]:
    """The experts implementation of each experts class in ``model`` (for messages and diagnostics)."""
    return {type(m).__name__: getattr(m.config, "_experts_implementation", None) for m in experts_modules(model)}
