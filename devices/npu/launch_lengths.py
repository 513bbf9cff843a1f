"""How an update's per-request lists become the host lengths of one captured attention launch.

The runner updates a graph with one entry per request row of the graph, padded with 0: the lengths attended to
(``SlotRole.SEQ_LENS``) and, in a packed prefill batch, the new tokens per request (``SlotRole.QUERY_LENS``).
What a launch takes depends on its layout:

- Decode (FIA "BSH"/"BSND"/"BNSD", ``_npu_paged_attention``): the KV length of each request, the update's
  ``seq_lens`` as they are.
- Decode in "TND" (vllm-ascend's decode route from 2.8 on): every request has one query token, so the query
  ends are ``1..B`` for the graph's B rows and stay as captured; the update gives the KV lengths only.
- Packed prefill (FIA ``input_layout="TND"``: query ``[T, N, D]``, every request's tokens back to back): the
  query tokens as CUMULATIVE ends (``actual_seq_lengths`` / v2 ``actual_seq_qlen``: request ``i`` ends at row
  ``sum(query_lens[:i + 1])``, so a request with no tokens repeats the previous end, which the op allows:
  "later value >= earlier", torch_npu's npu_fused_infer_attention_score doc, op-plugin docs at 7213914d), and
  the KV length of each request (with a block table each request's tokens are read through its own row, so
  these are per request, not cumulative: vllm-ascend passes ``seq_lens_list``, attention_v1.py
  ``_get_fia_params``, main 182b75ea).

The token tail. In TND, T is the sum of the query lengths: the last cumulative end must be T (vllm-ascend
inserts a dummy request so that it is, ``_pad_query_start_loc_for_fia`` in worker/model_runner_v1.py; FIA
fails with error 561002 otherwise, attention_v1.py L352-369). A graph's T is its token bucket while the live
tokens vary, so a TND launch in an npu graph carries ONE REQUEST MORE than the graph's request rows: the last,
the token tail, owns the rows past the live tokens. Its block-table row is a tensor of the capture, and its KV
length is a host value the update keeps as captured; the update ends it at T. (refmodel's npu prefill kernel
appends it, reading the null block, with KV length 1, as vllm-ascend's dummy request does.)

A TND launch over a paged cache is refused in a graph on a build whose op-plugin does not document it: page
attention in TND, and TND in graph mode, are documented from torch_npu 7.3 (op-plugin 7213914d; 480bc431 and
691bf15a list both as unsupported). The build's line is told by its API (the ``_infer_output`` helpers, 7.3 on).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Sequence

import torch

from devices.npu.host_length_ops import HostLengthOp, HostLengthUpdateError
from devices.npu.op_arguments import argument_value, passed_value
from devices.npu.runtime import TorchNpu

PACKED_LAYOUT = "TND"


@dataclass(frozen=True)
class LaunchLengths:
    """What one captured launch takes as host lengths, and how an update's per-request lists map onto it.

    requests:        entries every update list must have (the graph's request rows).
    packed_tokens:   TND launches: T, the query's rows, where the token tail ends; None for the other layouts.
    tail_kv_length:  TND launches: the token tail's KV length, kept as captured.
    """

    op: HostLengthOp
    requests: int
    packed_tokens: int | None = None
    tail_kv_length: int = 0

    @property
    def takes_query_lens(self) -> bool:
        return self.packed_tokens is not None

    def arguments(self, seq_lens: Sequence[int], query_lens: Sequence[int] | None) -> dict[str, Any]:
        """The launch's host-length arguments for these per-request lists (validated by the caller: ``requests``
        non-negative ints each), in the types the op's schema takes."""
        if self.packed_tokens is None:
            return {self.op.argument: self.op.host_value(seq_lens)}
        assert query_lens is not None and self.op.query_argument is not None
        ends = list(accumulate(query_lens))
        if ends and ends[-1] > self.packed_tokens:
            raise HostLengthUpdateError(
                f"the update's query_lens add up to {ends[-1]} tokens, but this npu graph's attention was captured "
                f"for {self.packed_tokens} packed tokens"
            )
        return {
            self.op.query_argument: [*ends, self.packed_tokens],  # the token tail ends at T
            self.op.argument: self.op.host_value([*seq_lens, self.tail_kv_length]),
        }


def launch_lengths(
    op: HostLengthOp, func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], runtime: TorchNpu
) -> LaunchLengths:
    """The ``LaunchLengths`` of a call of ``op`` seen while a graph captures (module docstring)."""
    kv_lengths = argument_value(func, args, kwargs, op.argument)
    query_ends = passed_value(func, args, kwargs, op.query_argument) if op.query_argument else None
    layout = passed_value(func, args, kwargs, "input_layout") if op.query_argument else None
    if layout == PACKED_LAYOUT and passed_value(func, args, kwargs, "block_table") is not None:
        _check_packed_paged_in_graph(func, runtime)
    if layout == PACKED_LAYOUT and query_ends is not None and _one_token_each(query_ends, args, kv_lengths):
        return LaunchLengths(op, requests=len(kv_lengths))  # decode in TND: the query ends stay as captured
    if layout != PACKED_LAYOUT:
        if query_ends is not None:
            raise HostLengthUpdateError(
                f"{func} passes {op.query_argument} in layout {layout!r}: an npu graph updates query lengths only in "
                f"the packed {PACKED_LAYOUT!r} layout (cumulative ends); call it in {PACKED_LAYOUT!r}, or outside the "
                "graph (mode 'breakable' or 'piecewise')"
            )
        return LaunchLengths(op, requests=len(kv_lengths))
    if query_ends is None:
        raise HostLengthUpdateError(f"{func} in layout {PACKED_LAYOUT!r} was called without {op.query_argument!r}")
    tokens = int(args[0].shape[0])
    if len(query_ends) != len(kv_lengths) or len(query_ends) < 2 or int(query_ends[-1]) != tokens:
        raise HostLengthUpdateError(
            f"{func} in layout {PACKED_LAYOUT!r} in an npu graph must end with a token tail: one request past the "
            f"graph's request rows whose cumulative query end is the query's {tokens} rows (devices.npu."
            f"launch_lengths); got {len(query_ends)} query ends ending at {query_ends[-1] if query_ends else None} "
            f"and {len(kv_lengths)} KV lengths"
        )
    return LaunchLengths(op, requests=len(kv_lengths) - 1, packed_tokens=tokens, tail_kv_length=int(kv_lengths[-1]))


def _one_token_each(query_ends: Sequence[Any], args: Sequence[Any], kv_lengths: Sequence[Any]) -> bool:
    """A TND call of one query token per request and no token tail: query ends ``1..T``, one per KV length."""
    tokens = int(args[0].shape[0])
    return len(kv_lengths) == tokens and [int(end) for end in query_ends] == list(range(1, tokens + 1))


def _check_packed_paged_in_graph(func: torch._ops.OpOverload, runtime: TorchNpu) -> None:
    if runtime.op("_npu_fused_infer_attention_score_infer_output") is not None:  # 7.3 on
        return
    raise HostLengthUpdateError(
        f"{func} in layout {PACKED_LAYOUT!r} over a paged cache (block_table) was met in an NPU graph capture on "
        f"{runtime.build}, whose op-plugin documents neither page attention in TND nor TND in graph mode (torch_npu "
        "7.1 and 7.2; documented from 7.3, op-plugin 7213914d). Install torch_npu 7.3 or later (pip torch-npu "
        "2.6.0.post5 on), or run this attention outside the graph (mode 'piecewise' or 'breakable')"
    )
