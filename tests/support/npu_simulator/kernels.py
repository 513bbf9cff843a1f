"""SIMULATED Ascend attention kernels that take per-request lengths as host values, run on the CPU.

Registered as real torch ops (namespace ``npu_simulator``, defined once per process) so that dispatch modes
see them exactly as they see torch_npu's ops:

- ``npu_fused_infer_attention_score`` (and ``.out``): torch_npu 2.14's fused infer attention, incremental
  (decode) branch with a paged KV cache: query ``[B, 1, N*D]`` (``input_layout="BSH"``) or ``[B, 1, N, D]``
  ("BSND"), key/value ``[num_blocks, block_size, KV_N*D]``, ``block_table`` int32 ``[B, max_blocks]``,
  ``actual_seq_lengths_kv`` a HOST list of B ints. float16/bfloat16 only, as on hardware. torch_npu 2.14 has
  a capture handler for it (``auto_dispatch``).
- ``_npu_paged_attention``: paged attention writing into ``out``, lengths as a host (CPU) int32 tensor
  ``context_lens``; torch_npu has no capture handler for it, so graphs need the explicit task-group path.

A row whose length is 0 attends to nothing and gets zeros. Shape limits of the real kernels (head dims,
block sizes that are multiples of 16) are not checked. A launch made inside another op's kernel while a
graph is captured is an error (``HiddenLaunchError``): no dispatch mode, torch_npu's included, saw it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from support.npu_simulator import state
from support.npu_simulator.errors import HiddenLaunchError, NotSimulatedError

NAMESPACE = "npu_simulator"
_DTYPES = (torch.float16, torch.bfloat16)
_ORIGINAL_TOLIST = torch._C.TensorBase.tolist  # the simulator reads its own host arguments unpatched

_FIA_ARGUMENTS = (
    "Tensor query, Tensor key, Tensor value, *, Tensor? block_table=None, SymInt[]? actual_seq_lengths_kv=None, "
    "int num_heads=1, float scale=1.0, str input_layout=\"BSH\", int num_key_value_heads=0, int block_size=0, "
    "bool softmax_lse_flag=False"
)
SCHEMAS = {
    "npu_fused_infer_attention_score": f"npu_fused_infer_attention_score({_FIA_ARGUMENTS}) -> (Tensor, Tensor)",
    "npu_fused_infer_attention_score.out": (
        f"npu_fused_infer_attention_score.out({_FIA_ARGUMENTS}, Tensor? workspace=None, Tensor(a!)[] out) -> ()"
    ),
    "_npu_paged_attention": (
        "_npu_paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, int num_kv_heads, int num_heads, "
        "float scale_value, Tensor block_table, Tensor context_lens, *, Tensor(a!) out) -> ()"
    ),
}
# Host arguments of each simulated op: copied at capture, replaceable by an update.
HOST_ARGUMENTS = {
    "npu_fused_infer_attention_score": ("actual_seq_lengths_kv",),
    "_npu_paged_attention": ("context_lens",),
}


def host_arguments(func: torch._ops.OpOverload) -> tuple[str, ...]:
    namespace, _, name = func._schema.name.partition("::")
    return HOST_ARGUMENTS.get(name, ()) if namespace == NAMESPACE else ()


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
        raise ValueError(f"{op}: the paged (block_table) branch needs actual_seq_lengths_kv, one host int per request")
    lengths = [int(length) for length in lengths]
    if len(lengths) != batch:
        raise ValueError(f"{op}: {len(lengths)} lengths for a batch of {batch}")
    for length in lengths:
        if not 0 <= length <= capacity:
            raise ValueError(f"{op}: length {length} outside 0..{capacity} (block table width x block_size)")
    return lengths


def _check_visible(op: str) -> None:
    """Inside a capture, a host-argument launch must be the op the recorder is running, not hidden in another."""
    sim = state.current()
    running = sim.ops_running
    if sim.capturing_graph is not None and running and running[-1]._schema.name != f"{NAMESPACE}::{op}":
        raise HiddenLaunchError(
            f"{op} was launched inside {running[-1]}'s kernel while a graph was captured: no dispatch mode saw it, "
            "so its host lengths are baked in and no update can reach them. Call it directly from Python"
        )


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    actual_seq_lengths_kv: Sequence[int] | None = None,
    num_heads: int = 1,
    scale: float = 1.0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    block_size: int = 0,
    softmax_lse_flag: bool = False,
) -> torch.Tensor:
    op = "npu_fused_infer_attention_score"
    _check_visible(op)
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"{op}: query, key and value must share float16 or bfloat16; got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if input_layout not in ("BSH", "BSND"):
        raise NotSimulatedError(f"{op}: input_layout {input_layout!r} is not simulated (BSH, BSND are)")
    if block_table is None:
        raise NotSimulatedError(f"{op}: only the paged KV cache (block_table) is simulated")
    if query.shape[1] != 1:
        raise NotSimulatedError(f"{op}: only the incremental branch (query S == 1) is simulated")
    if softmax_lse_flag:
        raise NotSimulatedError(f"{op}: softmax_lse_flag=True is not simulated")
    batch = query.shape[0]
    num_kv_heads = num_key_value_heads or num_heads
    head_dim = (query.shape[2] // num_heads) if input_layout == "BSH" else query.shape[3]
    if block_size != key.shape[1]:
        raise ValueError(f"{op}: block_size {block_size} but the key cache has blocks of {key.shape[1]}")
    lengths = _checked_lengths(op, actual_seq_lengths_kv, batch, block_table.shape[1] * block_size)
    state.current().log_launch(op, lengths)
    key_cache = key.reshape(key.shape[0], block_size, num_kv_heads, head_dim)
    value_cache = value.reshape(value.shape[0], block_size, num_kv_heads, head_dim)
    queries = query.reshape(batch, num_heads, head_dim)
    return _paged_decode(queries, key_cache, value_cache, block_table, lengths, scale).reshape(query.shape)


def fused_infer_attention_score(query, key, value, **options):  # type: ignore[no-untyped-def]
    return _fused_attention(query, key, value, **options), torch.zeros(1, dtype=torch.float32)


def fused_infer_attention_score_out(query, key, value, *, workspace=None, out, **options):  # type: ignore[no-untyped-def]
    out[0].copy_(_fused_attention(query, key, value, **options))


def paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table, context_lens, *, out):  # type: ignore[no-untyped-def]  # noqa: E501
    op = "_npu_paged_attention"
    _check_visible(op)
    if query.dtype not in _DTYPES or key_cache.dtype != query.dtype:
        raise TypeError(f"{op}: query and caches must share float16 or bfloat16; got {query.dtype}, {key_cache.dtype}")
    if context_lens.dtype != torch.int32 or context_lens.dim() != 1:
        shape = tuple(context_lens.shape)
        raise TypeError(f"{op}: context_lens must be a 1-D int32 host tensor, got {context_lens.dtype} {shape}")
    block_size = key_cache.shape[1]
    lengths = _checked_lengths(op, _ORIGINAL_TOLIST(context_lens), query.shape[0], block_table.shape[1] * block_size)
    state.current().log_launch(op, lengths)
    out.copy_(_paged_decode(query, key_cache, value_cache, block_table, lengths, scale_value))


def max_workspace(query: torch.Tensor) -> torch.Tensor:
    """``_npu_fused_infer_attention_score_get_max_workspace``: the simulated kernel needs none; a token buffer."""
    return torch.empty(1, dtype=torch.uint8, device=query.device)


def _define_ops() -> Any:
    if hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "_npu_paged_attention"):
        return None  # defined by an earlier import of this module under another name
    library = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        library.define(schema)
    library.impl("npu_fused_infer_attention_score", fused_infer_attention_score, "CPU")
    library.impl("npu_fused_infer_attention_score.out", fused_infer_attention_score_out, "CPU")
    library.impl("_npu_paged_attention", paged_attention, "CPU")
    return library


# Kept for the process's lifetime: a Library unregisters its ops when collected. The ops are inert without
# the simulator installed (nothing outside it names this namespace).
_LIBRARY = _define_ops()


def ops() -> Any:
    return getattr(torch.ops, NAMESPACE)
