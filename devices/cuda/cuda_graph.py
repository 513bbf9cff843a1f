"""``CudaGraph``: one ``torch.cuda.CUDAGraph``, the GPU it is for, and whether it holds a capture.

torch's own misuse errors come from C++ as bare ``RuntimeError``s ("Called CUDAGraph::replay without a
preceding successful capture", "This CUDAGraph instance already owns a captured graph") that name neither
the device nor what to do. The plugin keeps the state itself, so capturing twice or replaying before a
capture is a ``hal.GraphStateError`` on cuda as on every device, raised before torch is asked.
"""

from __future__ import annotations

import torch

from hal import GraphStateError


class CudaGraph:
    """The cuda plugin's graph object: made by ``hal_make_graph``, captured and replayed by the plugin."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.cuda_graph = torch.cuda.CUDAGraph()
        self.captured = False

    def check_capturable(self) -> None:
        if self.captured:
            raise GraphStateError(
                f"this cuda:{self.index} graph is already captured: make a new graph per capture (Device.make_graph)"
            )

    def replay(self) -> None:
        if not self.captured:
            raise GraphStateError(
                f"replay of a cuda:{self.index} graph that was never captured (or whose capture failed): capture "
                "it first (Device.capture_session), or make a new graph and capture that"
            )
        self.cuda_graph.replay()

    def __repr__(self) -> str:
        return f"CudaGraph(cuda:{self.index}, captured={self.captured})"
