"""A step a runner queued without waiting for it: what ``BucketedRunner.submit`` hands back.

A server that overlaps its steps (vLLM's async scheduling, SGLang's overlap scheduler, TensorRT-LLM's overlap
scheduler) prepares step n+1 on the host while the device runs step n, and feeds what step n produced (its
sampled tokens) into step n+1 on the device, the host reading it back one step later for stopping and
streaming. ``submit`` queues the input copies, the replay and a copy of the outputs out of the graph pool,
records an event, and returns: the host never waits.

Where the outputs live, and why. A graph writes its outputs into its pool, and the next replay of any graph
of that pool rewrites them: ``run`` hands back views of that memory, valid until the next step. A handle's
outputs are copies, made on the device right after the replay into memory of the ordinary stream-ordered
allocator, so they are the caller's for as long as it holds them, whatever runs next. The other way, a ring
of output buffers that steps take in turn, saves the copy but hands back memory that a later step rewrites:
held one step too long, an output silently becomes another step's, the hazard copies remove (vLLM PR 53520
was such a reuse). What it costs is one small copy per kept output (``keep``: sampled tokens are a few bytes
a request), measured by the bench.
"""

from __future__ import annotations

from collections.abc import Mapping  # isinstance against typing's alias costs three times as much, per step
from typing import Any, Sequence

import torch

import hal
from runners.output_tree import map_tensors


class StepHandle:
    """A queued step: its outputs (device tensors the caller owns, readable by device work queued after it at
    once, by the host once ``done``) and the event recorded after them.

    ``outputs`` may be fed into the next step's batch as they are: the device runs the steps in order, so the
    next step reads them after this one wrote them. The host must not read them before ``wait`` (or ``done``);
    ``to_host`` starts copying them to the host without waiting.
    """

    def __init__(self, outputs: Any, device: "hal.Device") -> None:
        self.outputs = outputs
        self._device = device
        self._event = device.event()
        self._event.record()  # after the copies out of the pool: what the outputs need, nothing later

    def done(self) -> bool:
        """Whether the device has finished the step (never blocks)."""
        return bool(self._event.query())

    def wait(self) -> Any:
        """Block the host until the step has finished; its outputs."""
        self._event.synchronize()
        return self.outputs

    def to_host(self) -> "HostCopy":
        """Queue copies of the outputs into host memory (page-locked, so the copy does not wait on the
        device's queue) and an event after them; returns at once."""
        copies = map_tensors(_host_copy, self.outputs)
        event = self._device.event()
        event.record()
        return HostCopy(copies, event)


class HostCopy:
    """Outputs on their way to the host: ``wait`` (or ``done``) before reading them."""

    def __init__(self, outputs: Any, event: Any) -> None:
        self._outputs = outputs
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> Any:
        """Block until the copies have landed; the outputs as host tensors."""
        self._event.synchronize()
        return self._outputs


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor  # already the host's (and the caller's: a handle's outputs are copies)
    # Page-locked memory: a copy from a pageable one makes the host wait for the device's queue.
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class KeptOutputs:
    """Which outputs ``submit(keep=...)`` hands back, refused before the step runs where that can be known.

    The names a forward returns are learned from its first step; from then on a ``keep`` naming an output the
    forward does not return is refused before the step writes the KV cache or the pool, not after.
    """

    def __init__(self) -> None:
        self._names: frozenset[str] | None = None

    def check(self, keep: Sequence[str] | None) -> None:
        if keep is None:
            return
        if isinstance(keep, str) or not all(isinstance(name, str) for name in keep):
            raise TypeError(f"submit(keep=...) takes a list of output names, got {keep!r}")
        if self._names is not None and not set(keep) <= self._names:
            raise ValueError(f"submit(keep={list(keep)}) names outputs the forward does not return; it returns {sorted(self._names)}")

    def select(self, outputs: Any, keep: Sequence[str] | None) -> Any:
        """The outputs to copy: all of them, or the ``keep`` ones of a dict."""
        if isinstance(outputs, Mapping):
            self._names = frozenset(outputs)
        if keep is None:
            return outputs
        if not isinstance(outputs, Mapping) or not set(keep) <= outputs.keys():
            have = sorted(outputs) if isinstance(outputs, Mapping) else f"a {type(outputs).__name__}"
            raise ValueError(f"submit(keep={list(keep)}) names outputs the forward does not return; it returns {have}")
        return {name: outputs[name] for name in keep}
