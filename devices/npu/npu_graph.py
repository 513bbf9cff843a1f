"""``NpuGraph``: one ``torch.npu.NPUGraph`` plus what replaying and updating it in order needs.

Order of one step, for a graph whose attention takes host lengths (see ``graph_update``):

    update i:  update stream waits on the event recorded after replay i-1 of this graph,
               then re-issues each attention launch with the new lengths and records its ExternalEvent
    replay i:  launched on the device's current stream; each attention task waits on its ExternalEvent, so
               it runs only once update i has landed, while the kernels before it run meanwhile
               then ``replayed`` is recorded after it, for update i+1 to wait on

So replay i never sees update i-1's lengths (its tasks wait for update i's event) and replay i-1 never sees
update i's (update i starts only after replay i-1 finished). Without the second half, a host faster than the
device updates the task while replay i-1 still waits to run it: replay i-1 reads step i's lengths and eats
its event, and replay i then waits forever (vllm-ascend's hang under async scheduling, fixed there with a
host synchronize before every replay, acl_graph.py L252-266 at main 182b75ea; here the update stream waits on
the device instead).
"""

from __future__ import annotations

from typing import Any

from devices.npu.host_length_launches import ExplicitLaunch
from devices.npu.host_length_ops import SharedWorkspaces
from devices.npu.runtime import TorchNpu
from hal import GraphHalError, GraphStateError


class MissingUpdateError(GraphHalError, RuntimeError):
    """A graph with host-length launches was replayed without an update since its previous replay."""


class NpuGraph:
    """The npu plugin's graph object: made by ``hal_make_graph``, captured, replayed and updated by the plugin."""

    def __init__(self, runtime: TorchNpu, index: int) -> None:
        self.runtime = runtime
        self.index = index
        # Built with the graph's device current: from 7.3 on, the first NPUGraph() of a process also makes
        # torch_npu's update stream on the current device (graphs.py L92-95 at v7.3.0), and on 7.1/7.2 every
        # NPUGraph() makes one (L92-95 at v7.1.0); a stream on another device would open a context there.
        with runtime.npu.device(index):
            self.npu_graph = runtime.npu.NPUGraph()
        self.launches: list[ExplicitLaunch] = []  # host-length launches, in capture order
        self.workspaces = SharedWorkspaces()  # one per op, shared by the graph's launches (host_length_ops)
        self.captured = False
        self.replays = 0
        self.update_pending = False  # an update arrived since the last replay
        # Recorded on the replay's stream after every replay; the next update waits on it (module docstring).
        self.replayed_event: Any = None

    @property
    def batch(self) -> int | None:
        """How many lengths an update must give: the request count the launches were captured for."""
        return self.launches[0].batch if self.launches else None

    def replay(self) -> None:
        if not self.captured:
            raise GraphStateError(
                f"replay of an npu:{self.index} graph that was never captured (or whose capture failed): capture it "
                "first (Device.capture_session), or make a new graph and capture that"
            )
        if self.launches and not self.update_pending:
            raise MissingUpdateError(
                f"replay of an npu graph with {len(self.launches)} attention launch(es) taking host lengths, without "
                f"an update since its {'capture' if self.replays == 0 else 'previous replay'}: on hardware their tasks "
                "would wait forever for the update's event. Call Device.update(graph, {'seq_lens': [...]}) before "
                "every replay (with 'query_lens' too for a packed prefill batch)"
            )
        npu = self.runtime.npu
        self.npu_graph.replay()
        if self.replayed_event is None:
            self.replayed_event = npu.Event()
        # NPUGraph::replay runs on the current stream of the capture's device (NPUGraph.cpp, replay, v26.0.0).
        self.replayed_event.record(npu.current_stream(self.index))
        self.replays += 1
        self.update_pending = False

    def discard(self) -> None:
        """Drop what a failed capture recorded; the object is not captured afterwards."""
        self.npu_graph.reset()
        self.launches.clear()
        self.workspaces = SharedWorkspaces()
        self.captured = False

    def __repr__(self) -> str:
        return f"NpuGraph(npu:{self.index}, captured={self.captured}, host_length_launches={len(self.launches)})"
