"""The npu device's preflight: the Ascend stack's prerequisites for updatable graphs, checked before any capture.

Each missing prerequisite otherwise shows as an opaque ACL error code at the first capture or update. Checked,
when the device is loaded (``hal_graph_modes``) and shown by ``graphhal info`` (``hal_stack_checks``):

- ``TASK_QUEUE_ENABLE``: at 2, torch_npu refuses every graph capture (``NPUGraph::capture_begin``,
  torch_npu/csrc/core/npu/NPUGraph.cpp); vllm-ascend's tuning guide exports it. 0 or 1 capture.
- The driver (Ascend HDK): task updates (``aclmdlRICaptureTaskUpdateBegin``, what every attention length
  update is) need HDK 25.0.RC1 or later.
- The CANN runtime: ``libascendcl.so`` exports the capture task-group and task-update calls
  (``aclmdlRICaptureTaskGrpBegin``, ``aclmdlRICaptureTaskUpdateBegin``) torch_npu's task-group functions call.
- The max-workspace query: torch_npu exposes ``_npu_fused_infer_attention_score_get_max_workspace``, and CANN's
  operator library ``libopapi.so`` the call it makes (``aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize``),
  which sizes the one workspace an updatable fused-attention launch keeps (``host_length_ops``). Without it
  the fused op cannot be captured updatably; reported as missing, not refused (a model may never call the op,
  and breakable and piecewise graphs run attention outside the graphs).

A prerequisite the plugin cannot read (no version file, no library on the path) is reported as unknown and
not refused: only what is known to be wrong stops the device. ``NpuStackError`` lists every failure with
what to change.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from devices.npu import ascend_stack
from hal import DeviceUnavailableError

MIN_HDK = (25, 0, 1)  # 25.0.RC1
MIN_HDK_TEXT = "25.0.RC1"
TASK_UPDATE_SYMBOLS = ("aclmdlRICaptureTaskGrpBegin", "aclmdlRICaptureTaskUpdateBegin")
MAX_WORKSPACE_HELPER = "_npu_fused_infer_attention_score_get_max_workspace"
MAX_WORKSPACE_SYMBOL = "aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize"

PASSED, FAILED, UNKNOWN, MISSING = "ok", "FAILED", "unknown", "missing"


class NpuStackError(DeviceUnavailableError):
    """The Ascend stack lacks a prerequisite of updatable NPU graphs (the message says which, and what to change)."""


@dataclass(frozen=True)
class StackCheck:
    """One prerequisite: ``name``, ``outcome`` (ok, FAILED or unknown), ``found`` (what was read) and ``fix``
    (what to change; empty when it passed)."""

    name: str
    outcome: str
    found: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.name}: {self.outcome} ({self.found})" + (f"; {self.fix}" if self.fix else "")


def _task_queue() -> StackCheck:
    value = os.environ.get("TASK_QUEUE_ENABLE")
    found = f"TASK_QUEUE_ENABLE={value}" if value is not None else "TASK_QUEUE_ENABLE unset (torch_npu's default, 1)"
    if value is not None and value.strip() == "2":
        return StackCheck(
            "task queue", FAILED, found,
            "torch_npu refuses to capture NPU graphs at task queue level 2 (NPUGraph.cpp, capture_begin): export "
            "TASK_QUEUE_ENABLE=1 (or 0, or unset it) in the environment that starts the process",
        )
    return StackCheck("task queue", PASSED, found)


def hdk_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, release candidate) of an HDK version string ("25.0.rc1", "24.1.RC3.1", "25.0.0");
    a final release counts as after every candidate. None when unreadable."""
    match = re.match(r"\s*(\d+)\.(\d+)\.(?:rc(\d+)|(\d+))", text, re.IGNORECASE)
    if match is None:
        return None
    candidate = int(match.group(3)) if match.group(3) is not None else 1000 + int(match.group(4))
    return int(match.group(1)), int(match.group(2)), candidate


def _driver(stack: ascend_stack.AscendStack) -> StackCheck:
    version = stack.driver_version()
    if version is None:
        return StackCheck(
            "driver", UNKNOWN,
            "no version.info under the driver's folder (ASCEND_DRIVER_PATH, default /usr/local/Ascend/driver)",
            f"task updates need Ascend HDK {MIN_HDK_TEXT} or later: check `npu-smi info`",
        )
    parsed = hdk_version(version)
    if parsed is None:
        return StackCheck("driver", UNKNOWN, f"HDK {version}, unreadable", f"task updates need HDK {MIN_HDK_TEXT} or later")
    if parsed < MIN_HDK:
        return StackCheck(
            "driver", FAILED, f"HDK {version}",
            f"updating a captured task (aclmdlRICaptureTaskUpdateBegin, every attention length update) needs Ascend "
            f"HDK {MIN_HDK_TEXT} or later: upgrade the driver and firmware",
        )
    return StackCheck("driver", PASSED, f"HDK {version}")


def _runtime(stack: ascend_stack.AscendStack) -> StackCheck:
    answers = {symbol: stack.runtime_has(symbol) for symbol in TASK_UPDATE_SYMBOLS}
    if any(answer is None for answer in answers.values()):
        return StackCheck("CANN runtime", UNKNOWN, f"{ascend_stack.ACL_LIBRARY} could not be loaded to look for "
                          f"{', '.join(TASK_UPDATE_SYMBOLS)}")
    missing = [symbol for symbol, present in answers.items() if not present]
    if missing:
        return StackCheck(
            "CANN runtime", FAILED, f"{ascend_stack.ACL_LIBRARY} lacks {', '.join(missing)}",
            "install a CANN toolkit whose runtime has the capture task-group and task-update calls (the one "
            f"released with HDK {MIN_HDK_TEXT} or later) and source its set_env.sh",
        )
    return StackCheck("CANN runtime", PASSED, f"{ascend_stack.ACL_LIBRARY} has {', '.join(TASK_UPDATE_SYMBOLS)}")


def _max_workspace(torch_npu: Any, stack: ascend_stack.AscendStack) -> StackCheck:
    fix = (
        "full graphs cannot update torch_npu's fused attention (its workspace cannot be sized for every length): "
        "install a torch_npu of the lines 7.1 on with a CANN whose operator library has the query, or use mode "
        "breakable or piecewise (attention outside the graphs)"
    )
    if not hasattr(torch_npu, MAX_WORKSPACE_HELPER):
        return StackCheck("max-workspace query", MISSING, f"torch_npu has no {MAX_WORKSPACE_HELPER}", fix)
    exported = stack.op_library_has(MAX_WORKSPACE_SYMBOL)
    if exported is None:
        return StackCheck(
            "max-workspace query", UNKNOWN,
            f"torch_npu.{MAX_WORKSPACE_HELPER}; {ascend_stack.OP_API_LIBRARY} could not be loaded to look for {MAX_WORKSPACE_SYMBOL}",
        )
    if not exported:
        return StackCheck("max-workspace query", MISSING, f"{ascend_stack.OP_API_LIBRARY} lacks {MAX_WORKSPACE_SYMBOL}", fix)
    return StackCheck("max-workspace query", PASSED, f"torch_npu.{MAX_WORKSPACE_HELPER}, {ascend_stack.OP_API_LIBRARY} has {MAX_WORKSPACE_SYMBOL}")


def stack_checks(torch_npu: Any) -> list[StackCheck]:
    """Every prerequisite, in the order a capture meets them."""
    stack = ascend_stack.current()
    return [_task_queue(), _driver(stack), _runtime(stack), _max_workspace(torch_npu, stack)]


def refuse_failures(torch_npu: Any) -> list[StackCheck]:
    """The checks; raises ``NpuStackError`` naming every failed one and what to change."""
    checks = stack_checks(torch_npu)
    failed = [check for check in checks if check.outcome == FAILED]
    if failed:
        raise NpuStackError(
            "the npu device cannot capture updatable graphs on this stack: "
            + "; ".join(f"{check.name}: {check.found}: {check.fix}" for check in failed)
        )
    return checks
