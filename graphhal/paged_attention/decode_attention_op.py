"""``graphhal::decode_attention``: the decode attention custom op the model calls, one kernel per device.

It writes into a caller-provided ``out`` instead of returning a tensor (vLLM's "_with_output" convention):
a graph strategy can then cut the compiled graph at this op, run it eagerly between captured pieces, and the
pieces still find the result in a buffer they own.

Kernels: CUDA runs the Triton kernel; CPU runs the math row by row over only the tokens each row uses; NPU
runs torch_npu's fused infer-attention op (``graphhal.paged_attention.npu_decode_attention``, which the model reaches without going
through the custom op, so an NPU graph capture can update its host lengths); any other device runs the
full-width reference, which is slow but has no data-dependent shapes.

The model calls it through ``decode_attention_break``, which runs the CPU or CUDA kernel directly when nothing
traces or records the call (``graphhal.paged_attention.direct_kernels``), and the op itself otherwise.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

import hal
from graphhal.paged_attention import npu_decode_attention
from graphhal.paged_attention.decode_attention_reference import decode_attention_reference
from graphhal.paged_attention.direct_kernels import unobserved_eager_call


@torch.library.custom_op("graphhal::decode_attention", mutates_args=("out",))
def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write paged decode attention of ``q`` into ``out`` (same shape).

    ``q`` is [batch, num_heads, head_dim] (one new token per row) or [batch, query_tokens, num_heads, head_dim]
    (``query_tokens`` per row, causal among them: speculative verification). See
    ``decode_attention_reference`` for the shapes and the math (GQA, causal lengths, zeros where seq_len is 0).
    """
    out.copy_(decode_attention_reference(q, key_cache, value_cache, block_tables, seq_lens, scale))


@decode_attention.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, scale, out) -> None:
    return None


@decode_attention.register_kernel("cpu")
def _decode_attention_cpu(q, key_cache, value_cache, block_tables, seq_lens, scale, out) -> None:
    # Row by row, gathering only the tokens each row attends to. Reading seq_lens on the host costs nothing
    # on CPU and this op is opaque to tracing, so no captured graph ever holds the values. Gathering the
    # full block-table width instead (what the reference does) is memory-bound: a default-config step at
    # batch 64 spent 5x (contexts up to 256) to 10x (up to 1024) longer in attention that way.
    multi_token = q.dim() == 4
    if not multi_token:
        q, out = q[:, None], out[:, None]
    batch, query_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    offsets_in_block = torch.arange(block_size)
    # Query token i of a row sits at cached position seq_len - query_tokens + i: it sees the tokens up to it.
    ahead = torch.arange(query_tokens - 1, -1, -1)[:, None]  # [query_tokens, 1]: tokens after query token i
    for row, seq_len in enumerate(hal.host_list(seq_lens)):  # once per step inside hal.step_host_values
        if seq_len <= 0:
            out[row].zero_()
            continue
        blocks = block_tables[row, : -(-seq_len // block_size)].long()
        slots = (blocks[:, None] * block_size + offsets_in_block).reshape(-1)[:seq_len]
        keys = flat_keys.index_select(0, slots).transpose(0, 1).float()  # [kv_heads, seq_len, head_dim]
        values = flat_values.index_select(0, slots).transpose(0, 1).float()
        # A KV head's queries: its group of heads for every query token, [kv_heads, query_tokens * group, head_dim].
        queries = q[row].reshape(query_tokens, num_kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(
            num_kv_heads, query_tokens * group, head_dim
        ).float()
        mask = None
        if query_tokens > 1:
            visible = torch.arange(seq_len)[None, :] < (seq_len - ahead)  # [query_tokens, seq_len]
            if not bool(visible.any(dim=1).all()):  # a token seeing nothing: seq_len < query_tokens
                visible[~visible.any(dim=1), 0] = True  # softmax over one key, zeroed below
            mask = visible.repeat_interleave(group, dim=0)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        attended = attended.reshape(num_kv_heads, query_tokens, group, head_dim).permute(1, 0, 2, 3)
        if query_tokens > 1 and seq_len < query_tokens:
            attended[: query_tokens - seq_len] = 0  # those tokens' causal length is 0: zeros, as the reference
        out[row].copy_(attended.reshape(query_tokens, num_heads, head_dim))


@decode_attention.register_kernel("cuda")
def _decode_attention_cuda(q, key_cache, value_cache, block_tables, seq_lens, scale, out) -> None:
    _triton_paged_decode_attention()(q, key_cache, value_cache, block_tables, seq_lens, scale, out)


@functools.cache
def _triton_paged_decode_attention() -> Callable[..., None]:
    # Imported on the first CUDA call so that `import graphhal.paged_attention` needs neither triton nor CUDA; looked up once,
    # since an import statement costs about 1.5 us on every call.
    from graphhal.paged_attention.triton_decode_attention import paged_decode_attention

    return paged_decode_attention


npu_decode_attention.register_npu_kernel(decode_attention, npu_decode_attention.decode_attention_npu)

_decode_attention_op = torch.ops.graphhal.decode_attention.default
# The kernels the op dispatches to, by device type, for the model's direct eager calls (npu tensors never get
# here: calls_npu_directly routes them first).
_DIRECT_KERNELS = {"cpu": _decode_attention_cpu, "cuda": _decode_attention_cuda}


def _decode_attention_step(q, key_cache, value_cache, block_tables, seq_lens, scale, out) -> None:  # type: ignore[no-untyped-def]
    # The op, or its kernel directly when nothing watches the call (graphhal.paged_attention.direct_kernels): the op's Python
    # layers cost about 25 us a call, once per layer per step.
    if unobserved_eager_call(q):
        kernel = _DIRECT_KERNELS.get(q.device.type)
        if kernel is not None:
            return kernel(q, key_cache, value_cache, block_tables, seq_lens, scale, out)
    return _decode_attention_op(q, key_cache, value_cache, block_tables, seq_lens, scale, out)


# What the model calls. In a breakable capture the attention is the break: it runs eagerly between captured
# segments. In a full capture it is captured inline (required=False): the kernels read lengths and block
# tables from device memory, so the op is graph-safe (on npu the lengths are host values the device updates
# before every replay).
decode_attention_break = hal.break_point(
    npu_decode_attention.calls_npu_directly(_decode_attention_step),
    name="graphhal.decode_attention",
    required=False,
)

# Its kernels read lengths and block tables from device memory (npu: host lengths the device updates before
# each replay), and launch one program per (row, query token) with the row's query token count baked into
# the launch: capturable in any uniform batch (q new tokens per request, q = 1 for plain decode), never in a
# mixed one. Prefill never calls it.
hal.declare_graph_support(_decode_attention_op, hal.GraphSupport.UNIFORM_BATCH)

# Piecewise graphs split at this op: it writes into `out`, so the pieces around it keep fixed addresses.
hal.register_splitting_op(torch.ops.graphhal.decode_attention.default)
