"""Debug switches no engine has, each off by default and turned on by one environment variable (read when
the runner is made) or one attribute (``runner.debug.verify_capture``, ``runner.debug.poison_outputs``):

- ``GRAPHHAL_VERIFY_CAPTURE=1``: right after ``capture()``, replay every bucket once against an eager run of
  the same padded batch with random live rows, on every rank, and fail the capture (``GraphVerifyError``)
  naming the bucket, the output and the largest difference. Catches stale metadata: a value the graph took
  from the capture's inputs that eager recomputes (torchtitan 3709, flashinfer 1968).
- ``GRAPHHAL_POISON_OUTPUTS=1``: before each replay (after the batch is copied in: a server may feed the last
  step's outputs to this one), fill the previous replay's output views with NaN (the smallest integer for
  integer outputs), so a consumer reading a view the runner overwrote fails loudly instead of reading another
  step's numbers (vLLM PR 53520); and a graph that leaves part of its output unwritten shows NaN there.
- host values baked into a graph, on the cpu reference device: ``GRAPHHAL_REPORT_BAKED_VALUES=1``
  (``devices.cpu.baked_values``).

The random live rows: floats from a normal distribution; integers 0 or 1 (an index any table has); a packed
batch's per-request token counts (``hal.SlotRole.QUERY_LENS``) splitting the live tokens among the live
requests, and lengths attended to (``SEQ_LENS``) equal to them; padded rows and requests get their fills.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils import _pytree as pytree

import hal
from runners.graph_outputs import GraphOutputs
from runners.step_inputs import BatchRows

VERIFY_CAPTURE_ENV = "GRAPHHAL_VERIFY_CAPTURE"
POISON_OUTPUTS_ENV = "GRAPHHAL_POISON_OUTPUTS"
# Graph and eager run the same kernels on the same inputs; what a device may differ by (a reduction's order).
VERIFY_RTOL = VERIFY_ATOL = 1e-3


class GraphVerifyError(hal.CaptureError):
    """A captured bucket replayed to different numbers than an eager run of the same padded batch."""


def switched_on(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class DebugSwitches:
    """A runner's debug switches (module docstring); ``before_replay`` and ``handed_out`` are its run path's."""

    def __init__(self) -> None:
        self.verify_capture = switched_on(VERIFY_CAPTURE_ENV)
        self.poison_outputs = switched_on(POISON_OUTPUTS_ENV)
        self._handed_out: list[torch.Tensor] = []  # the previous replay's output views

    def before_replay(self) -> None:
        if self.poison_outputs:
            for view in self._handed_out:
                view.fill_(_poison(view.dtype))
            self._handed_out = []

    def handed_out(self, outputs: Any) -> Any:
        if self.poison_outputs:
            self._handed_out = [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]
        return outputs

    def after_capture(self, runner: Any) -> None:
        """With ``verify_capture``: verify every bucket; on a mismatch (on any rank) close the runner and raise."""
        self._handed_out = []  # views of graphs closed before this capture: their memory is no longer theirs
        if not self.verify_capture or not runner.captures_graphs:
            return
        try:
            for bucket in runner.buckets.capture_order():
                error = None
                try:
                    verify_bucket(runner, bucket)
                except Exception as exc:  # any failure is agreed on, or the other ranks would wait at the agreement
                    error = exc
                runner._capture.ranks.agree(f"the verification of bucket {bucket}", error, bucket=bucket, mode=runner.config.mode)
        except BaseException:
            runner.close()
            raise


def verify_bucket(runner: Any, bucket: int, seed: int = 0) -> None:
    """Replay ``bucket`` on a random batch and run the same padded batch eagerly; raise ``GraphVerifyError``
    naming the output and the largest difference where they differ."""
    generator = torch.Generator().manual_seed(seed + bucket)
    inputs = runner.inputs
    rows = int(torch.randint(1, bucket + 1, (1,), generator=generator))
    requests = min(rows, int(torch.randint(1, inputs.max_requests + 1, (1,), generator=generator))) if inputs.max_requests else 0
    batch = random_batch(inputs, rows, requests, generator, runner.device.torch_device)
    shape = BatchRows(rows, requests)
    replayed = pytree.tree_map_only(torch.Tensor, torch.clone, runner._replay(batch, shape, bucket))
    padded = {name: view.clone() for name, view in inputs.views(bucket).items()}  # what the graph just read
    eager = GraphOutputs(runner._forward(padded), bucket, runner.request_outputs, inputs.max_requests).live_rows(rows, requests)
    worst = None
    for path, (graph_leaf, eager_leaf) in zip(_paths(eager), zip(pytree.tree_leaves(replayed), pytree.tree_leaves(eager))):
        difference = _difference(graph_leaf, eager_leaf)
        if difference is not None and (worst is None or difference > worst[1]):
            worst = (path, difference)
    if worst is not None:
        raise GraphVerifyError(
            f"{runner.phase} bucket {bucket} (mode {runner.config.mode}) on {runner.device} replays to different numbers "
            f"than an eager run of the same padded batch ({rows} live rows): largest difference {worst[1]:.3g} in "
            f"{worst[0]}. The graph baked in something eager recomputes (metadata prepared on the host, a Python "
            "value, a tensor swapped after capture); run with GRAPHHAL_REPORT_BAKED_VALUES=1 on the cpu device to name it.",
            bucket=bucket, mode=str(runner.config.mode), device=str(runner.device),
        )


def random_batch(inputs: Any, rows: int, requests: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    batch = {}
    query_lens = None
    if requests:
        cuts = torch.sort(torch.randint(0, rows + 1, (requests - 1,), generator=generator)).values
        query_lens = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([rows])]))
    for slot in inputs.slots:
        count = requests if slot in inputs.request_slots else rows
        if slot.role in (hal.SlotRole.QUERY_LENS, hal.SlotRole.SEQ_LENS) and query_lens is not None:
            value = query_lens.to(slot.dtype)
        elif slot.role == hal.SlotRole.SEQ_LENS:  # at least the slot's fill: q new tokens for a verify step
            value = (torch.randint(0, 2, (count, *slot.row_shape), generator=generator) + int(slot.fill)).to(slot.dtype)
        elif slot.dtype.is_floating_point:
            value = torch.randn((count, *slot.row_shape), generator=generator).to(slot.dtype)
        else:
            value = torch.randint(0, 2, (count, *slot.row_shape), generator=generator).to(slot.dtype)
        on_host = slot.role == hal.SlotRole.QUERY_LENS  # a runner reads it on the host
        batch[slot.name] = value if on_host else value.to(device)
    return batch


def _poison(dtype: torch.dtype) -> Any:
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _difference(graph: Any, eager: Any) -> float | None:
    """The largest difference where ``graph`` and ``eager`` differ beyond the tolerance; None where they agree."""
    if not isinstance(graph, torch.Tensor):
        return None
    eager = eager.to(graph.device)
    if graph.dtype.is_floating_point:
        close = torch.isclose(graph.float(), eager.float(), rtol=VERIFY_RTOL, atol=VERIFY_ATOL, equal_nan=True)
    else:
        close = graph == eager
    if bool(close.all()):
        return None
    return float((graph.double() - eager.double()).abs().nan_to_num(float("inf")).max())


def _paths(outputs: Any) -> list[str]:
    """A name for every tensor leaf of ``outputs``, in pytree order."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    paths, _ = pytree.tree_flatten_with_path(outputs)
    return ["output" + pytree.keystr(path) for path, _ in paths]
