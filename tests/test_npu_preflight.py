"""The npu device's preflight on the CPU SIMULATOR: each prerequisite of updatable graphs (TASK_QUEUE_ENABLE,
the driver's HDK version, the CANN runtime's task-update symbols, the max-workspace query) refused, or reported
as unknown, with what to change; ``graphhal info`` showing the checks. The simulator's state stands for the
driver and CANN runtime (``devices.npu.ascend_stack``)."""

from __future__ import annotations

import pytest
import hal
from devices.npu.preflight import NpuStackError, hdk_version
from graphhal.cli.main import main
from support.npu_simulator.fixture import npu_simulated_on_cpu

pytestmark = pytest.mark.cpu


def _device() -> hal.Device:
    return hal.DeviceRegistry(load_entry_points=False).get_device("npu")


def test_a_sound_stack_passes_and_info_shows_every_check(capsys):
    with npu_simulated_on_cpu():
        assert "full" in _device().modes
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    for line in (
        "task queue: ok (TASK_QUEUE_ENABLE unset",
        "driver: ok (HDK 25.0.rc1)",
        "CANN runtime: ok (libascendcl.so has aclmdlRICaptureTaskGrpBegin, aclmdlRICaptureTaskUpdateBegin)",
        "max-workspace query: ok (torch_npu._npu_fused_infer_attention_score_get_max_workspace, libopapi.so has "
        "aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize)",
    ):
        assert line in out, out


def test_task_queue_level_2_is_refused_at_device_load_saying_what_to_export(monkeypatch):
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    with npu_simulated_on_cpu():
        with pytest.raises(hal.DeviceUnavailableError, match=r"TASK_QUEUE_ENABLE=2.*export TASK_QUEUE_ENABLE=1"):
            _device()


def test_task_queue_level_2_set_after_load_is_refused_before_the_next_capture(monkeypatch):
    with npu_simulated_on_cpu():
        device = _device()
        monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
        with pytest.raises(hal.DeviceUnavailableError, match=r"TASK_QUEUE_ENABLE=2.*export TASK_QUEUE_ENABLE=1"):
            device.make_graph("full")


def test_a_driver_older_than_hdk_25_0_rc1_is_refused_naming_the_call_and_the_version():
    with npu_simulated_on_cpu() as simulator:
        simulator.driver_version = "24.1.rc3"
        with pytest.raises(NpuStackError, match=r"driver: HDK 24.1.rc3: .*aclmdlRICaptureTaskUpdateBegin.*HDK 25.0.RC1 or later"):
            _device()


def test_a_cann_runtime_without_the_task_update_call_is_refused():
    with npu_simulated_on_cpu() as simulator:
        simulator.runtime_symbols = frozenset({"aclmdlRICaptureTaskGrpBegin"})
        with pytest.raises(NpuStackError, match=r"CANN runtime: libascendcl.so lacks aclmdlRICaptureTaskUpdateBegin: install"):
            _device()


def test_what_cannot_be_read_is_unknown_not_refused(capsys):
    with npu_simulated_on_cpu() as simulator:
        simulator.driver_version = None
        simulator.runtime_symbols = None
        assert "full" in _device().modes
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "driver: unknown (no version.info" in out and "npu-smi info" in out, out
    assert "CANN runtime: unknown (libascendcl.so could not be loaded" in out, out


def test_a_torch_npu_without_the_max_workspace_query_is_reported(capsys):
    with npu_simulated_on_cpu() as simulator:
        del simulator.torch_npu._npu_fused_infer_attention_score_get_max_workspace
        assert "full" in _device().modes  # reported, not refused: a model may never call the fused op
        assert main(["info"]) == 0
    assert "max-workspace query: missing (torch_npu has no _npu_fused_infer_attention_score_get_max_workspace); full graphs" in capsys.readouterr().out


def test_a_cann_without_the_max_workspace_call_is_reported_with_what_to_do(capsys):
    with npu_simulated_on_cpu() as simulator:
        simulator.op_api_symbols = frozenset()
        assert "full" in _device().modes
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "max-workspace query: missing (libopapi.so lacks aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize)" in out, out
    assert "use mode breakable or piecewise" in out


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("25.0.rc1", (25, 0, 1)), ("24.1.RC3.1", (24, 1, 3)), ("25.0.0", (25, 0, 1000)), ("garbage", None)],
)
def test_hdk_versions_are_read_with_a_release_after_its_candidates(text, parsed):
    assert hdk_version(text) == parsed
