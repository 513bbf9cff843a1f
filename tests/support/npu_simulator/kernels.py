"""SIMULATED Ascend attention kernels that take per-request lengths as host values, run on the CPU.

Registered as real torch ops so that dispatch modes see them exactly as they see torch_npu's ops, with the
schemas torch_npu registers (op-plugin's op_plugin_functions.yaml and ops/atb/PagedAttentionAtb.cpp, with
torch_npu's codegen turning two out arguments into ``Tensor[] out -> (Tensor, Tensor)``,
codegen/custom_functions.py L213-221), cut to the arguments the decode and packed-prefill branches use. One
namespace per op-plugin generation, since a torch op's schema cannot change within a process:

- ``npu_simulator_op_plugin_7_1`` (op-plugin 480bc431, torch_npu 7.1): ``npu_fused_infer_attention_score``
  (``.default``, ``.out``) and ``_npu_paged_attention`` without a workspace.
- ``npu_simulator_op_plugin_7_2`` (691bf15a on, 7.2 to 26.x): the same FIA, ``npu_fused_infer_attention_score_v2``
  and ``_npu_paged_attention(..., Tensor(a!) out, *, Tensor? workspace=None)``.

The ops: the fused infer attention (v1: ``actual_seq_lengths_kv``; v2: ``actual_seq_kvlen``), incremental
(decode) branch with a paged KV cache: query ``[B, 1, N*D]`` ("BSH") or ``[B, 1, N, D]`` ("BSND"), key/value
``[num_blocks, block_size, KV_N*D]``, ``block_table`` int32 ``[B, max_blocks]``, lengths a HOST list of B ints;
a query S > 1 (speculative verification) with ``sparse_mode`` 3 and its mask, each request's S tokens causal
from its cached context on (rightDownCausal, as in TND), every KV length at least S (refused below: no
document covers this route, page attention with S > 1 in BSH, so nothing below S is guessed).
``_npu_paged_attention``: query ``[B, N, D]``, caches ``[blocks, block_size, KV_N, D]``, lengths as a host
(CPU) int32 tensor ``context_lens`` (positional 7), output ``out`` (positional 8). float16/bfloat16 only, as on
hardware. A row whose length is 0 attends to nothing and gets zeros (what hardware gives there is not
documented). FIA v1 and v2 also run the packed prefill branch, ``input_layout="TND"`` with cumulative query
lengths (``actual_seq_lengths`` / ``actual_seq_qlen``) and ``sparse_mode`` 0 or 3 (``packed_prefill``); both
length arguments are host arguments, copied at capture and replaced by updates. Each line's documented limits
apply (``TorchNpuProfile.fia_*``): the incremental branch's block_size (16-aligned; at most 512 from 7.2),
a head dim of at most 512, and a cache holding the blocks the lengths need together; TND's in ``packed_prefill``.

Workspaces, as each helper sizes them: FIA's ``_get_max_workspace`` asks CANN for the call's MAX workspace,
simulated as covering every length the block table allows; ATB's ``_npu_paged_attention_get_workspace`` sizes
it from the ``context_lens`` it is given, so a workspace sized with a capture's short lengths is too small for
longer ones. A launch whose lengths need more than its workspace fails (on hardware: silently undersized).
How the real sizes depend on the query split is not documented.

A launch made inside another op's kernel while a graph is captured is an error (``HiddenLaunchError``): no
dispatch mode, torch_npu's included, saw it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from support.npu_simulator import packed_prefill, state
from support.npu_simulator.errors import HiddenLaunchError, NotSimulatedError
from support.npu_simulator.profiles import TorchNpuProfile

_DTYPES = (torch.float16, torch.bfloat16)
_ORIGINAL_TOLIST = torch._C.TensorBase.tolist  # the simulator reads its own host arguments unpatched
WORKSPACE_BYTES_PER_BLOCK = 64  # the simulated kernels' scratch per (request, KV block)

_FIA_V1 = (
    "Tensor query, Tensor key, Tensor value, *, Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, "
    "SymInt[]? actual_seq_lengths_kv=None, Tensor? block_table=None, int num_heads=1, float scale=1.0, "
    'str input_layout="BSH", int num_key_value_heads=0, int sparse_mode=0, int block_size=0, '
    "bool softmax_lse_flag=False"
)
_FIA_V2 = (
    "Tensor query, Tensor key, Tensor value, *, Tensor? atten_mask=None, SymInt[]? actual_seq_qlen=None, "
    "SymInt[]? actual_seq_kvlen=None, Tensor? block_table=None, int num_query_heads=1, int num_key_value_heads=0, "
    'float softmax_scale=1.0, str input_layout="BSH", int sparse_mode=0, int block_size=0, '
    "bool return_softmax_lse=False"
)
_PA = (
    "Tensor query, Tensor key_cache, Tensor value_cache, int num_kv_heads, int num_heads, float scale_value, "
    "Tensor block_table, Tensor context_lens, Tensor(a!) out"
)
SCHEMAS_7_1 = {
    "npu_fused_infer_attention_score": f"npu_fused_infer_attention_score({_FIA_V1}) -> (Tensor, Tensor)",
    "npu_fused_infer_attention_score.out": (
        f"npu_fused_infer_attention_score.out({_FIA_V1}, Tensor? workspace=None, Tensor[] out) -> (Tensor, Tensor)"
    ),
    "_npu_paged_attention": f"_npu_paged_attention({_PA}) -> ()",
}
SCHEMAS_7_2 = {
    **SCHEMAS_7_1,
    "npu_fused_infer_attention_score_v2": f"npu_fused_infer_attention_score_v2({_FIA_V2}) -> (Tensor, Tensor)",
    "npu_fused_infer_attention_score_v2.out": (
        f"npu_fused_infer_attention_score_v2.out({_FIA_V2}, Tensor? workspace=None, Tensor[] out) -> (Tensor, Tensor)"
    ),
    "_npu_paged_attention": f"_npu_paged_attention({_PA}, *, Tensor? workspace=None) -> ()",
}
NAMESPACES = {"npu_simulator_op_plugin_7_1": SCHEMAS_7_1, "npu_simulator_op_plugin_7_2": SCHEMAS_7_2}
# Host arguments of each simulated op: copied at capture, replaceable by an update.
HOST_ARGUMENTS = {
    "npu_fused_infer_attention_score": ("actual_seq_lengths", "actual_seq_lengths_kv"),
    "npu_fused_infer_attention_score_v2": ("actual_seq_qlen", "actual_seq_kvlen"),
    "_npu_paged_attention": ("context_lens",),
}


def is_simulated(func: torch._ops.OpOverload) -> bool:
    return func._schema.name.partition("::")[0] in NAMESPACES


def host_arguments(func: torch._ops.OpOverload) -> tuple[str, ...]:
    namespace, _, name = func._schema.name.partition("::")
    return HOST_ARGUMENTS.get(name, ()) if namespace in NAMESPACES else ()


def takes_workspace(func: torch._ops.OpOverload) -> bool:
    """The overload accepts a workspace (FIA ``.out``; ``_npu_paged_attention`` from op-plugin 7.2)."""
    return is_simulated(func) and any(argument.name == "workspace" for argument in func._schema.arguments)


def allocates_workspace(func: torch._ops.OpOverload) -> bool:
    """The kernel needs a workspace, and allocates one itself when the call passes none (every simulated op:
    op-plugin's FIA runs EXEC_NPU_CMD without one, FusedInferAttentionScoreKernelNpuOpApi.cpp L478-505 at
    7213914d; ATB's RunAtbCmd, PagedAttentionAtb.cpp L48 at 480bc431 and L50 at 691bf15a)."""
    return is_simulated(func)


def copy_host_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    return list(value) if isinstance(value, (list, tuple)) else value


def argument_value(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
    """An argument of a call as dispatch sees it; KeyError when it was not passed (a default applies)."""
    if name in kwargs:
        return kwargs[name]
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if position < len(args):
                return args[position]
            if argument.has_default_value():
                return argument.default_value
    raise KeyError(name)


def with_argument(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    names = [argument.name for argument in func._schema.arguments]
    if name in kwargs or name not in names or names.index(name) >= len(args):
        return tuple(args), {**kwargs, name: value}
    position = names.index(name)
    return (*args[:position], value, *args[position + 1 :]), dict(kwargs)


# --- the math -------------------------------------------------------------------------------------------


def _paged_decode(q, key_cache, value_cache, block_table, lengths, scale):  # type: ignore[no-untyped-def]
    """q [B, N, D]; caches [blocks, block_size, KV_N, D]; lengths: host ints. Returns [B, N, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    flat_keys = key_cache.reshape(-1, num_kv_heads, head_dim)
    flat_values = value_cache.reshape(-1, num_kv_heads, head_dim)
    out = torch.zeros_like(q)
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        blocks = block_table[row, : -(-length // block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:length]
        keys = flat_keys.index_select(0, slots).transpose(0, 1).float()
        values = flat_values.index_select(0, slots).transpose(0, 1).float()
        queries = q[row].reshape(num_kv_heads, group, head_dim).float()
        # Plain math rather than scaled_dot_product_attention: at these sizes its CPU kernel costs ~100x more.
        probabilities = torch.softmax(queries @ keys.transpose(-1, -2) * scale, dim=-1)
        out[row] = (probabilities @ values).reshape(num_heads, head_dim).to(q.dtype)
    return out


def _checked_lengths(op: str, lengths: Any, batch: int, capacity: int) -> list[int]:
    if lengths is None:
        raise ValueError(f"{op}: the paged (block_table) branch needs the KV lengths, one host int per request")
    lengths = [int(length) for length in lengths]
    if len(lengths) != batch:
        raise ValueError(f"{op}: {len(lengths)} lengths for a batch of {batch}")
    for length in lengths:
        if not 0 <= length <= capacity:
            raise ValueError(f"{op}: length {length} outside 0..{capacity} (block table width x block_size)")
    return lengths


def workspace_bytes(lengths: Sequence[int], block_size: int) -> int:
    """Scratch the simulated kernels need for ``lengths``: grows with the longest request."""
    longest_blocks = max([-(-int(length) // max(block_size, 1)) for length in lengths] + [1])
    return WORKSPACE_BYTES_PER_BLOCK * len(lengths) * longest_blocks


def _check_workspace(op: str, workspace: torch.Tensor | None, lengths: Sequence[int], block_size: int) -> None:
    if workspace is None:
        return  # the kernel allocates its own (capture and update check where that matters)
    needed = workspace_bytes(lengths, block_size)
    if workspace.numel() * workspace.element_size() < needed:
        raise ValueError(
            f"{op}: the workspace holds {workspace.numel() * workspace.element_size()} bytes but these lengths need "
            f"{needed}: it was sized for shorter lengths (size it at capture by the longest an update may bring)"
        )


def _check_visible(op: str) -> None:
    """Inside a capture, a host-argument launch must be the op the recorder is running, not hidden in another."""
    sim = state.current()
    running = sim.ops_running
    if sim.capturing_graph is not None and running and running[-1]._schema.name.partition("::")[2] != op:
        raise HiddenLaunchError(
            f"{op} was launched inside {running[-1]}'s kernel while a graph was captured: no dispatch mode saw it, "
            "so its host lengths are baked in and no update can reach them. Call it directly from Python"
        )


def _fused_attention(op: str, query, key, value, block_table, lengths, num_heads, scale, input_layout, num_kv_heads, block_size, lse, query_ends=None, atten_mask=None, sparse_mode=0):  # type: ignore[no-untyped-def]  # noqa: E501
    _check_visible(op)
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"{op}: query, key and value must share float16 or bfloat16; got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if block_table is None:
        raise NotSimulatedError(f"{op}: only the paged KV cache (block_table) is simulated")
    if lse:
        raise NotSimulatedError(f"{op}: returning the softmax lse is not simulated")
    num_kv_heads = num_kv_heads or num_heads
    if block_size != key.shape[1]:
        raise ValueError(f"{op}: block_size {block_size} but the key cache has blocks of {key.shape[1]}")
    if input_layout == "TND":
        return packed_prefill.attention(
            op, query, key, value, block_table, query_ends, lengths, num_heads, num_kv_heads, scale, block_size,
            atten_mask, sparse_mode,
        )
    if input_layout not in ("BSH", "BSND"):
        raise NotSimulatedError(f"{op}: input_layout {input_layout!r} is not simulated (BSH, BSND, TND are)")
    query_tokens = query.shape[1]
    if query_tokens != 1:
        # Several query tokens per request (speculative verification): simulated with sparse_mode 3 only.
        if sparse_mode != 3 or query_ends is not None:
            raise NotSimulatedError(
                f"{op}: in BSH/BSND a query S > 1 is simulated with sparse_mode 3 (causal from the cached context on) "
                "and per-request KV lengths only"
            )
        packed_prefill.checked_sparse_mode(op, sparse_mode, atten_mask)
    elif atten_mask is not None or sparse_mode:
        raise NotSimulatedError(f"{op}: masks (atten_mask, sparse_mode) are simulated in the TND layout and for S > 1 only")
    batch = query.shape[0]
    head_dim = (query.shape[2] // num_heads) if input_layout == "BSH" else query.shape[3]
    _check_incremental_paged(op, block_size, head_dim, key, block_table, batch)
    lengths = _checked_lengths(op, lengths, batch, block_table.shape[1] * block_size)
    if query_tokens != 1 and min(lengths) < query_tokens:
        # rightDownCausal aligns the S query rows with the last S KV tokens; with fewer KV tokens than S the
        # first rows would see none, which no op-plugin document covers for this route: refused, not guessed.
        raise ValueError(
            f"{op}: sparse_mode 3 with a query S of {query_tokens} needs every KV length to count the S query tokens "
            f"(>= {query_tokens}); got {lengths}: a KV length below S is not documented for BSH page attention"
        )
    blocks_needed = sum(-(-length // block_size) for length in lengths)
    if blocks_needed > key.shape[0]:
        raise ValueError(f"{op}: the KV lengths need {blocks_needed} blocks together but the cache has {key.shape[0]}")
    state.current().log_launch(op, lengths)
    key_cache = key.reshape(key.shape[0], block_size, num_kv_heads, head_dim)
    value_cache = value.reshape(value.shape[0], block_size, num_kv_heads, head_dim)
    if query_tokens != 1:
        # rightDownCausal per request: its S tokens are the last S of its KV length (packed_prefill's math).
        packed = query.reshape(batch * query_tokens, num_heads, head_dim)
        ends = [query_tokens * (row + 1) for row in range(batch)]
        out = packed_prefill.packed_paged_attention(packed, key_cache, value_cache, block_table, ends, lengths, scale, True)
        return out.reshape(query.shape), lengths
    queries = query.reshape(batch, num_heads, head_dim)
    return _paged_decode(queries, key_cache, value_cache, block_table, lengths, scale).reshape(query.shape), lengths


def _check_incremental_paged(op: str, block_size: int, head_dim: int, key, block_table, batch: int) -> None:  # type: ignore[no-untyped-def]
    """The incremental branch (Q_S = 1) with page attention, as op-plugin documents it at the profile's commit:
    block_size non-zero and 16-aligned for float16/bfloat16, at most 512 from 691bf15a; D at most 512; the
    cache as (blocknum, blocksize, H) in BSH/BSND; block_table 2-D with B rows."""
    profile = state.current().profile
    line = f"torch_npu {profile.name} (op-plugin {profile.op_plugin})"
    most = profile.fia_paged_max_block_size
    if block_size <= 0 or block_size % 16 or (most is not None and block_size > most):
        limit = f"16-aligned, at most {most}" if most is not None else "16-aligned"
        raise ValueError(f"{op}: {line} takes a page attention block_size {limit} (float16/bfloat16), got {block_size}")
    if head_dim > 512:
        raise ValueError(f"{op}: {line} takes a head dim of at most 512 with one query token, got {head_dim}")
    if key.dim() != 3:
        raise ValueError(f"{op}: in BSH/BSND the paged cache is (blocknum, blocksize, H), got {tuple(key.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"{op}: block_table must be 2-D with one row per request ({batch}), got {tuple(block_table.shape)}")


def _fia_v1(query, key, value, *, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None, block_table=None, num_heads=1, scale=1.0, input_layout="BSH", num_key_value_heads=0, sparse_mode=0, block_size=0, softmax_lse_flag=False):  # type: ignore[no-untyped-def]  # noqa: E501
    op = "npu_fused_infer_attention_score"
    return _fused_attention(
        op, query, key, value, block_table, actual_seq_lengths_kv, num_heads, scale, input_layout, num_key_value_heads,
        block_size, softmax_lse_flag, actual_seq_lengths, atten_mask, sparse_mode,
    )


def _fia_v2(query, key, value, *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None, block_table=None, num_query_heads=1, num_key_value_heads=0, softmax_scale=1.0, input_layout="BSH", sparse_mode=0, block_size=0, return_softmax_lse=False):  # type: ignore[no-untyped-def]  # noqa: E501
    op = "npu_fused_infer_attention_score_v2"
    return _fused_attention(
        op, query, key, value, block_table, actual_seq_kvlen, num_query_heads, softmax_scale, input_layout,
        num_key_value_heads, block_size, return_softmax_lse, actual_seq_qlen, atten_mask, sparse_mode,
    )


def _default(attention):  # type: ignore[no-untyped-def]
    def default(query, key, value, **options):  # type: ignore[no-untyped-def]
        output, _ = attention(query, key, value, **options)
        return output, torch.zeros(1, dtype=query.dtype)

    return default


def _out(attention, op):  # type: ignore[no-untyped-def]
    def out_overload(query, key, value, *, workspace=None, out, **options):  # type: ignore[no-untyped-def]
        output, lengths = attention(query, key, value, **options)
        _check_workspace(f"{op}.out", workspace, lengths, options.get("block_size", 0))
        out[0].copy_(output)
        return out[0], out[1]

    return out_overload


def paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table, context_lens, out, *, workspace=None):  # type: ignore[no-untyped-def]  # noqa: E501
    op = "_npu_paged_attention"
    _check_visible(op)
    if query.dtype not in _DTYPES or key_cache.dtype != query.dtype:
        raise TypeError(f"{op}: query and caches must share float16 or bfloat16; got {query.dtype}, {key_cache.dtype}")
    if context_lens.dtype != torch.int32 or context_lens.dim() != 1:
        shape = tuple(context_lens.shape)
        raise TypeError(f"{op}: context_lens must be a 1-D int32 host tensor, got {context_lens.dtype} {shape}")
    block_size = key_cache.shape[1]
    lengths = _checked_lengths(op, _ORIGINAL_TOLIST(context_lens), query.shape[0], block_table.shape[1] * block_size)
    _check_workspace(op, workspace, lengths, block_size)
    state.current().log_launch(op, lengths)
    out.copy_(_paged_decode(query, key_cache, value_cache, block_table, lengths, scale_value))


# --- helpers torch_npu has besides the ops (allocations, no launches) --------------------------------------


def _longest_lengths(kwargs: dict[str, Any], name: str) -> list[int]:
    """The longest KV length of every request the call's block table allows: what a "max" workspace covers."""
    lengths = kwargs.get(name)
    requests = len(lengths) if lengths is not None else 1
    block_table, block_size = kwargs.get("block_table"), kwargs.get("block_size", 0)
    if block_table is None:
        return [int(length) for length in lengths] if lengths is not None else [1]
    return [block_table.shape[1] * block_size] * requests


# FIA's workspace helper asks CANN for the MAX workspace of the call (EXEC_GET_MAX_WORKSPACE_CMD ->
# aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize, FusedInferAttentionScoreKernelNpuOpApi.cpp at 7213914d):
# simulated as covering every length the block table allows, whatever lengths the call passes (vllm-ascend
# sizes it with its capture's dummy lengths and reuses it for every update). ATB's paged attention sizes its
# workspace from the context_lens it is given (paged_attention_workspace, below): not a maximum.


def fia_max_workspace(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
    """``_npu_fused_infer_attention_score_get_max_workspace``: scratch for any length the block table allows."""
    size = workspace_bytes(_longest_lengths(kwargs, "actual_seq_lengths_kv"), kwargs.get("block_size", 0))
    return torch.empty(size, dtype=torch.uint8, device=query.device)


def fia_v2_max_workspace(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
    size = workspace_bytes(_longest_lengths(kwargs, "actual_seq_kvlen"), kwargs.get("block_size", 0))
    return torch.empty(size, dtype=torch.uint8, device=query.device)


def fia_infer_output(query, value, **kwargs):  # type: ignore[no-untyped-def]
    """``_npu_fused_infer_attention_score{,_v2}_infer_output`` (7.3 on): outputs shaped as the kernel writes."""
    return torch.empty_like(query), torch.empty(1, dtype=torch.float32, device=query.device)


def paged_attention_workspace(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table, context_lens, out):  # type: ignore[no-untyped-def]  # noqa: E501
    """``_npu_paged_attention_get_workspace`` (op-plugin 7.2 on): sized from ``context_lens`` as given (ATB)."""
    size = workspace_bytes(_ORIGINAL_TOLIST(context_lens), key_cache.shape[1])
    return torch.empty(size, dtype=torch.uint8, device=query.device)


def _define_ops() -> list[Any]:
    libraries = []
    for namespace, schemas in NAMESPACES.items():
        if hasattr(torch.ops, namespace) and hasattr(getattr(torch.ops, namespace), "_npu_paged_attention"):
            continue  # defined by an earlier import of this module under another name
        library = torch.library.Library(namespace, "DEF")
        for schema in schemas.values():
            library.define(schema)
        library.impl("npu_fused_infer_attention_score", _default(_fia_v1), "CPU")
        library.impl("npu_fused_infer_attention_score.out", _out(_fia_v1, "npu_fused_infer_attention_score"), "CPU")
        if "npu_fused_infer_attention_score_v2" in schemas:
            library.impl("npu_fused_infer_attention_score_v2", _default(_fia_v2), "CPU")
            library.impl(
                "npu_fused_infer_attention_score_v2.out", _out(_fia_v2, "npu_fused_infer_attention_score_v2"), "CPU"
            )
        library.impl("_npu_paged_attention", paged_attention, "CPU")
        libraries.append(library)
    return libraries


# Kept for the process's lifetime: a Library unregisters its ops when collected. The ops are inert without
# the simulator installed (nothing outside it names these namespaces).
_LIBRARIES = _define_ops()


def ops(profile: TorchNpuProfile) -> Any:
    """The op namespace of ``profile``'s op-plugin generation."""
    return getattr(torch.ops, "npu_simulator_op_plugin_7_2" if profile.paged_attention_workspace else "npu_simulator_op_plugin_7_1")
