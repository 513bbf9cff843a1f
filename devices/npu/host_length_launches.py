"""Host-length launches found while an NPU graph is captured, each bracketed so that an update can reach it.

``HostLengthCapture`` watches every op issued inside a capture. For an op of ``host_length_ops`` it does what
vllm-ascend does around its attention launches (attention_v1.py full_graph_fia, main 182b75ea): on the
capturing stream an ExternalEvent wait then reset (the replayed task waits until an update records the
event, and re-arms it), then ``graph_task_group_begin``, the op in its updatable form, and
``graph_task_group_end``, whose handle names the task for ``graph_task_update_begin`` later. The launch is
kept as an ``ExplicitLaunch`` holding every argument strongly: its outputs and workspace must outlive the
capture, since each update re-issues the op on them (torch_npu's own records hold weak aliases only,
``_weak_ref_tensor``, graphs.py L120-135 at v7.1.0).

Every op is bracketed here, none by torch_npu: the plugin never turns on ``auto_dispatch_capture``, so
torch_npu's dispatch mode is never pushed and can never bracket a launch a second time (``capture_session``).

Only ops called where a dispatch mode sees them are found: an op launched inside another op's kernel (a
custom op's npu kernel, which an Inductor-compiled forward calls) is hidden from every dispatch mode and its
lengths would stay baked in. That is why ``full`` with ``compiler="inductor"`` is refused on npu
(``devices.npu.hal_compiled_capture_problem``), and why refmodel calls the fused attention directly in eager
code (``graphhal.paged_attention.npu_decode_attention``, ``graphhal.paged_attention.npu_prefill_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from devices.npu.host_length_ops import HostLengthOp, SharedWorkspaces, host_length_op
from devices.npu.launch_lengths import LaunchLengths, launch_lengths
from devices.npu.op_arguments import with_argument
from devices.npu.runtime import TorchNpu


@dataclass
class ExplicitLaunch:
    """One bracketed launch of a graph: re-issued with new lengths between update_begin/end to update its task."""

    op: HostLengthOp
    lengths: LaunchLengths  # what the launch takes as host lengths, and how an update's lists map onto it
    func: torch._ops.OpOverload
    args: tuple[Any, ...]  # held strongly, workspace and outputs included: the task reads and writes them
    kwargs: dict[str, Any]
    handle: Any  # from graph_task_group_end
    event: Any  # the ExternalEvent the captured task waits on

    @property
    def batch(self) -> int:
        """Requests the launch was captured for: every update must give that many lengths of each kind."""
        return self.lengths.requests

    def call_with(
        self, seq_lens: Sequence[int], query_lens: Sequence[int] | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The captured call with these per-request lengths in place of the captured ones (in the schema's
        types; ``launch_lengths``). Built before ``graph_task_update_begin``: between begin and end only the
        re-issued launch belongs."""
        args, kwargs = self.args, self.kwargs
        for name, value in self.lengths.arguments(seq_lens, query_lens).items():
            args, kwargs = with_argument(self.func, args, kwargs, name, value)
        return args, kwargs

    def reissue(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.func(*args, **kwargs)
        # Keep what the task now reads: a host tensor (context_lens) is read by the launch on the host, but the
        # plugin holds it as long as the task, like everything else the task was given.
        self.args, self.kwargs = args, kwargs


class HostLengthCapture(TorchDispatchMode):
    """Active inside an NPU graph capture, on this thread: brackets every host-length op into ``launches``."""

    def __init__(self, runtime: TorchNpu, launches: list[ExplicitLaunch], workspaces: SharedWorkspaces) -> None:
        super().__init__()
        self._runtime = runtime
        self._launches = launches
        self._workspaces = workspaces

    @classmethod
    def is_infra_mode(cls) -> bool:
        # As torch_npu's own capture mode from 7.3 on (graphs.py L100-102 at v7.3.0): Dynamo skips frames while
        # a non-infra mode is on the stack (torch/_dynamo/convert_frame.py, any_torch_dispatch_mode_on_stack),
        # so compiled code called inside a capture would run eagerly, and its code object stays skipped after.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        op = host_length_op(func)
        if op is None:
            return func(*args, **kwargs)
        lengths = launch_lengths(op, func, args, kwargs, self._runtime)
        prepared = op.prepare(self._runtime, func, tuple(args), dict(kwargs), self._workspaces)
        npu = self._runtime.npu
        stream = npu.current_stream()
        event = npu.ExternalEvent()
        event.wait(stream)  # the captured task waits until an update records the event...
        event.reset(stream)  # ...and re-arms it, so the next replay waits for the next update
        npu.graph_task_group_begin(stream)
        try:
            issued = prepared.func(*prepared.args, **prepared.kwargs)
        except BaseException:
            _close_group(npu, stream)
            raise
        handle = npu.graph_task_group_end(stream)
        self._launches.append(ExplicitLaunch(op, lengths, prepared.func, prepared.args, prepared.kwargs, handle, event))
        return prepared.result(issued)


def _close_group(npu: Any, stream: Any) -> None:
    """End the task group a failing op left open, so the capture can end; the op's error is the one raised."""
    try:
        npu.graph_task_group_end(stream)
    except Exception:  # an empty group may be refused: the op's own error explains the failure better
        pass
