"""The Ascend ops that take per-request lengths as host values, and how each is made updatable in a graph.

A captured NPU graph bakes a host value into the task. To change it before a replay, the launch must sit in
a task group (its handle names the task for ``graph_task_update_begin``), and the update re-issues the same
op on the same memory with the new lengths. That only works when the launch writes into outputs and a
workspace that outlive the capture and that the update passes again: an op that allocates its own workspace
(or returns fresh outputs) would be re-issued with memory freed at once, which the captured task keeps using.
So each op here has a recipe, the one vllm-ascend uses (vllm_ascend/attention/attention_v1.py full_graph_fia
and full_graph_pa, main 182b75ea):

- ``npu_fused_infer_attention_score`` (FIA v1): lengths ``actual_seq_lengths_kv``, a host ``SymInt[]``; in the
  packed "TND" layout (prefill) also the query tokens, ``actual_seq_lengths``, as cumulative ends
  (``launch_lengths`` says how an update fills both). A
  ``.default`` call becomes ``.out`` with outputs allocated here (``_npu_fused_infer_attention_score_infer_output``
  where the build has it, 7.3 on; else ``empty_like(query)`` and a one-element lse, as torch_npu 7.1/7.2 do,
  graphs.py L147-148 at v7.1.0) and ``workspace=_npu_fused_infer_attention_score_get_max_workspace(...)``,
  CANN's MAX workspace for the call (``aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize``), asked with the
  capture's lengths as vllm-ascend does. A ``.out`` call gets the workspace when it has none. ``.out``'s registered schema has no alias annotation (torch_npu's codegen
  turns the two out arguments into ``Tensor[] out -> (Tensor, Tensor)``, codegen/custom_functions.py
  L213-221), so mutability is not read from the schema.
- ``npu_fused_infer_attention_score_v2`` (op-plugin 7.2 on): the same with ``actual_seq_kvlen`` (and
  ``actual_seq_qlen``) and the ``_v2`` helpers.
- ``_npu_paged_attention`` (ATB): lengths ``context_lens``, a host (CPU) int32 Tensor, positional 7; it writes
  ``out`` (positional 8). Its ``workspace`` keyword and ``_npu_paged_attention_get_workspace`` exist from
  op-plugin 7.2 on (PagedAttentionAtb.cpp L91-92 at 691bf15a; absent at 480bc431, torch_npu 7.1): a build
  without them cannot be updated safely, and a capture meeting the op there is refused, naming the build.
  ATB sizes that workspace from the ``context_lens`` it is given, not as a maximum, so it is asked with the
  longest lengths the block table allows, which bound every update.

Every launch of an op in one graph shares one workspace (``SharedWorkspaces``), as vllm-ascend shares one per
capture size, rather than one per layer.

Whether a build has a helper is read from the build, not from its version (``runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from devices.npu.runtime import TorchNpu
from hal import GraphHalError


class HostLengthUpdateError(GraphHalError, ValueError):
    """An update's lengths do not fit the graph, or a host-length op cannot be made updatable on this build."""


@dataclass
class PreparedLaunch:
    """An op call made updatable: what to issue inside the task group, and what the model's call returns."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Callable[[Any], Any]  # the issued call's result -> what the model's own call returns


@dataclass(frozen=True)
class HostLengthOp:
    """An op that takes per-request lengths as a host value.

    name:           the op's name without namespace or overload (``func._schema.name`` after ``::``).
    argument:       the schema argument that carries the per-request KV lengths.
    host_tensor:    the schema takes them as a Tensor (a CPU int32 tensor), not as ``SymInt[]``.
    prepare:        the recipe: the call as the model made it, and the graph's shared workspaces -> the
                    updatable call (module docstring).
    query_argument: the schema argument that carries the query tokens as cumulative ends in the packed "TND"
                    layout (a host ``SymInt[]``); None for an op without one.
    """

    name: str
    argument: str
    host_tensor: bool
    prepare: Callable[[TorchNpu, torch._ops.OpOverload, tuple[Any, ...], dict[str, Any], "SharedWorkspaces"], PreparedLaunch]
    query_argument: str | None = None

    def host_value(self, lengths: Sequence[int]) -> Any:
        """``lengths`` in the type the schema wants (issue 16: a list where the schema says Tensor fails inside
        an open update)."""
        if self.host_tensor:
            return torch.tensor(list(lengths), dtype=torch.int32, device="cpu")
        return [int(length) for length in lengths]


class SharedWorkspaces:
    """The workspaces of one graph's launches, one per op: every launch of an op in a graph shares the largest
    workspace it was sized with, as vllm-ascend shares one per capture size (``graph_params.workspaces``,
    attention_v1.py, main 182b75ea). The launches of one graph run one after another on its stream, and an
    update re-issues a launch without running it, so no two of them use the workspace at once. A launch sized
    larger than the shared one gets its own, which the later launches then share."""

    def __init__(self) -> None:
        self._by_op: dict[str, torch.Tensor] = {}

    def share(self, op: str, sized: torch.Tensor) -> torch.Tensor:
        """The workspace for a launch of ``op`` that ``sized`` (just allocated by the op's helper) would serve."""
        held = self._by_op.get(op)
        if held is not None and held.dtype == sized.dtype and held.device == sized.device and _bytes(held) >= _bytes(sized):
            return held  # ``sized`` is dropped: its memory goes back to the graph's pool
        self._by_op[op] = sized
        return sized

    def held(self) -> list[torch.Tensor]:
        return list(self._by_op.values())


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _needed(runtime: TorchNpu, name: str, op: str, why: str) -> Any:
    helper = runtime.op(name)
    if helper is None:
        raise HostLengthUpdateError(
            f"{op} cannot be made updatable on {runtime.build}: it has no torch_npu.{name}, which {why}; use a "
            "torch_npu of the 7.2, 7.3 or 26.0+ lines, or run this op outside the graph (mode 'breakable' or "
            "'piecewise')"
        )
    return helper


def _fused_attention(version: str) -> Callable[..., PreparedLaunch]:
    """The FIA recipe; ``version`` is "" for v1 and "_v2" for v2 (same helpers with a suffix)."""
    op = f"npu_fused_infer_attention_score{version}"
    lse_flag = "return_softmax_lse" if version else "softmax_lse_flag"
    # The keyword arguments torch_npu passes on to the infer-output helper (graphs.py L168-178 at v7.3.0;
    # ifa_handler.py at v26.0.0): the helper's schema takes only these.
    infer_output_keys = (
        ("query_dtype", "value_dtype", "input_layout", "quant_scale_out", "block_table", "num_query_heads",
         "num_key_value_heads", "return_softmax_lse", "query_rope", "out_dtype")
        if version
        else ("input_layout", "quant_scale2", "block_table", "num_heads", "num_key_value_heads", "softmax_lse_flag",
              "query_rope")
    )

    def prepare(
        runtime: TorchNpu, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], workspaces: SharedWorkspaces
    ) -> PreparedLaunch:
        kwargs = dict(kwargs)
        out_overload = getattr(runtime.op(op), "out", None)
        if out_overload is None:
            raise HostLengthUpdateError(f"{func} cannot be made updatable on {runtime.build}: torch_npu.{op} has no .out")
        is_out = func._overloadname == "out"
        call_kwargs = {key: value for key, value in kwargs.items() if key not in ("out", "workspace")}
        if kwargs.get("workspace") is None:
            get_workspace = _needed(
                runtime, f"_{op}_get_max_workspace", str(func), "sizes the workspace every update must reuse"
            )
            # The call's own lengths: the helper asks CANN for the MAX workspace, which covers every later update
            # (vllm-ascend sizes it the same way, with its capture's dummy lengths).
            kwargs["workspace"] = workspaces.share(op, get_workspace(*args, **call_kwargs))
        if is_out:
            return PreparedLaunch(func, tuple(args), kwargs, result=lambda issued: issued)
        kwargs["out"] = _fused_attention_outputs(runtime, op, args, call_kwargs, lse_flag, infer_output_keys)
        outputs = tuple(kwargs["out"])
        return PreparedLaunch(out_overload, tuple(args), kwargs, result=lambda issued: outputs)

    return prepare


def _fused_attention_outputs(
    runtime: TorchNpu, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], lse_flag: str, keys: tuple[str, ...]
) -> list[torch.Tensor]:
    infer_output = runtime.op(f"_{op}_infer_output")
    query, value = args[0], args[2]
    if infer_output is not None:  # 7.3 on: the output shapes the kernel will write
        return list(infer_output(query, value, **{key: kwargs[key] for key in keys if key in kwargs}))
    if kwargs.get(lse_flag):
        raise HostLengthUpdateError(
            f"{op} with {lse_flag}=True cannot be made updatable on {runtime.build}: it has no "
            f"torch_npu._{op}_infer_output to size the softmax lse (torch_npu 7.3 on); call {op}.out with your own "
            "outputs"
        )
    # What torch_npu 7.1/7.2 allocate for the swap (graphs.py L147-148 at v7.1.0): the BSH/BNSD output has
    # the query's shape, and the unrequested lse one element.
    return [torch.empty_like(query), torch.empty(1, dtype=query.dtype, device=query.device)]


def _paged_attention(
    runtime: TorchNpu, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], workspaces: SharedWorkspaces
) -> PreparedLaunch:
    kwargs = dict(kwargs)
    if not any(argument.name == "workspace" for argument in func._schema.arguments):
        raise HostLengthUpdateError(
            f"{func} cannot be made updatable on {runtime.build}: its schema has no workspace (op-plugin added it "
            "in 7.2), so an update would re-issue it with a workspace the kernel allocates and frees at once, "
            "which the captured task keeps using; use a torch_npu of the 7.2, 7.3 or 26.0+ lines, or run this op "
            "outside the graph (mode 'breakable' or 'piecewise')"
        )
    context_lens = args[7] if len(args) > 7 else kwargs.get("context_lens")
    if not isinstance(context_lens, torch.Tensor) or context_lens.device.type != "cpu":
        # ATB takes either (ParamSetter::Input clones a CPU one, AtbCommon.cpp L157-178 at op-plugin 691bf15a);
        # updates re-issue it with a CPU int32 tensor, as vllm-ascend builds it (attention_v1.py L323-330, main
        # 182b75ea), so the capture must pass one too.
        got = f"{context_lens.dtype} on {context_lens.device}" if isinstance(context_lens, torch.Tensor) else type(context_lens).__name__
        raise HostLengthUpdateError(
            f"{func} in an npu graph takes context_lens as a host (CPU) int32 tensor, which its updates re-issue; "
            f"got {got}"
        )
    if kwargs.get("workspace") is None:
        get_workspace = _needed(
            runtime, "_npu_paged_attention_get_workspace", str(func), "sizes the workspace every update must reuse"
        )
        # ATB sizes the workspace from the context_lens it is given (it is no "max" query): sized with the
        # capture's lengths, it would be too small for the longer ones an update brings, silently. So it is sized
        # for the longest every request's block table allows, which bounds every update.
        block_table, block_size = args[6], args[1].shape[1]
        longest = torch.full_like(context_lens, block_table.shape[1] * block_size)
        kwargs["workspace"] = workspaces.share(func._schema.name, get_workspace(*args[:7], longest, args[8]))
    return PreparedLaunch(func, tuple(args), kwargs, result=lambda issued: issued)


HOST_LENGTH_OPS = {
    op.name: op
    for op in (
        HostLengthOp(
            "npu_fused_infer_attention_score", "actual_seq_lengths_kv", False, _fused_attention(""), "actual_seq_lengths"
        ),
        HostLengthOp(
            "npu_fused_infer_attention_score_v2", "actual_seq_kvlen", False, _fused_attention("_v2"), "actual_seq_qlen"
        ),
        HostLengthOp("_npu_paged_attention", "context_lens", True, _paged_attention),
    )
}


def host_length_op(func: torch._ops.OpOverload) -> HostLengthOp | None:
    """The entry for ``func`` (any overload, any namespace: FIA lives in ``npu::``, PA in ``atb::``), or None."""
    return HOST_LENGTH_OPS.get(func._schema.name.split("::")[-1])
