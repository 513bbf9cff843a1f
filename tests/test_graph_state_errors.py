"""One error for graph state misuse on every device: capturing a graph twice, or replaying (or updating) one that
was never captured, is a ``hal.GraphStateError`` naming the device and what to do, on cpu, cuda and npu (on
the simulator of every torch_npu line) alike, and on hal's breakable graphs built on them. Before, the npu
device raised bare ``RuntimeError``s and cuda left it to torch's C++ errors, which name neither."""

from __future__ import annotations

import pytest
import torch

import hal
from support.npu_simulator.fixture import npu_profile, npu_simulator, simulated_npu  # noqa: F401 (fixtures)


def misuse_one_graph(device: hal.Device, mode: str, name: str) -> None:
    """Replay before capture, capture, capture again: the first and last are refused; the graph stays usable."""
    x = torch.ones(3, device=device.torch_device)
    pool = device.graph_pool()
    graph = device.make_graph(mode)
    with pytest.raises(hal.GraphStateError, match=rf"replay of an? {name} graph that was never captured.*capture it first"):
        device.replay(graph)
    with device.capture_session(graph, pool):
        y = x * 2
    with pytest.raises(hal.GraphStateError, match=rf"this {name} graph is already captured.*make a new graph per capture"):
        with device.capture_session(graph, pool):
            pass
    x.fill_(4)
    device.replay(graph)  # the refused second capture left the first intact
    device.synchronize()
    assert torch.equal(y.cpu(), torch.full((3,), 8.0))


@pytest.mark.cpu
def test_the_cpu_device_refuses_replaying_uncaptured_and_capturing_twice():
    misuse_one_graph(hal.get_device("cpu"), "full", "cpu")


@pytest.mark.cuda
def test_the_cuda_device_refuses_replaying_uncaptured_and_capturing_twice_before_torch_does():
    misuse_one_graph(hal.get_device("cuda"), "full", f"cuda:{torch.cuda.current_device()}")


@pytest.mark.cpu
def test_the_npu_device_refuses_replaying_updating_uncaptured_and_capturing_twice(simulated_npu):
    misuse_one_graph(simulated_npu, "full", "npu:0")
    with pytest.raises(hal.GraphStateError, match=r"update of an npu:0 graph that was never captured.*capture it first"):
        simulated_npu.update(simulated_npu.make_graph("full"), {hal.SlotRole.SEQ_LENS: [1]})


@pytest.mark.cpu
def test_a_breakable_graph_refuses_the_same_misuse_naming_its_device():
    misuse_one_graph(hal.get_device("cpu"), "breakable", "breakable cpu")


@pytest.mark.cpu
def test_graph_state_errors_are_graphhal_errors_a_server_can_catch():
    assert issubclass(hal.GraphStateError, hal.GraphHalError) and issubclass(hal.GraphStateError, RuntimeError)
