"""``graphhal::prefill_attention``: the prefill attention custom op the model calls, and its break point.

Like ``graphhal::decode_attention`` it writes into a caller-provided ``out`` (vLLM's "_with_output"
convention): a graph strategy that splits the compiled graph at this op runs it eagerly between captured
pieces, and the next piece reads ``out`` at the address it was captured with.

Its CPU and CUDA kernels read every length and block table from device memory, so the op can be captured in a
full graph of a whole prefill step, whatever the batch's split into requests (it declares
``GraphSupport.ANY_BATCH`` there). CUDA runs a Triton kernel (``graphhal.paged_attention.triton_prefill_attention``), CPU
the masked torch version (``graphhal.paged_attention.prefill_attention_masked``) wherever a graph may record the call, and
one SDPA per request over host lengths where nothing does (much faster, and on CPU the read is free). NPU
runs torch_npu's fused infer-attention op in the packed layout (``graphhal.paged_attention.npu_prefill_attention``), whose host
lengths the npu device updates before every replay, so it too is capturable in any batch; the model reaches it
without going through the custom op, so that an NPU graph capture sees the fused op. Any other device runs the
token-by-token reference, which reads the lengths on the host and declares that it cannot be captured.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import hal
from graphhal.paged_attention import npu_decode_attention, npu_prefill_attention
from graphhal.paged_attention.direct_kernels import unobserved_eager_call
from graphhal.paged_attention.prefill_attention_masked import prefill_attention_masked
from graphhal.paged_attention.prefill_attention_reference import prefill_attention_reference, prefill_layout


@torch.library.custom_op("graphhal::prefill_attention", mutates_args=("out",))
def prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write paged prefill attention of the packed ``q`` [T, num_heads, head_dim] into ``out`` (same shape).

    See ``prefill_attention_reference`` for the packed layout, the argument shapes and the math (causal from
    each request's cached context on, GQA, zeros in padded tokens' rows).
    """
    _check_out(q, out)
    out.copy_(prefill_attention_reference(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale))


@prefill_attention.register_fake
def _(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:
    return None


@prefill_attention.register_kernel("cpu")
def _prefill_attention_cpu(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:
    # Every request's tokens at once, masked: no length is read on the host, so a CPU graph can record it.
    _check_out(q, out)
    out.copy_(prefill_attention_masked(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale))


@prefill_attention.register_kernel("cuda")
def _prefill_attention_cuda(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:
    _check_out(q, out)
    # A server's scheduler has the query lengths on the host; the kernel reads them from device memory. (In a
    # runner's graphs they always are on the device: the runner copies every slot into its device buffer.)
    query_lens = query_lens.to(q.device, non_blocking=True)
    _triton_paged_prefill_attention()(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out)


def _prefill_attention_by_request(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:
    # The CPU kernel of the model's unobserved eager calls (graphhal.paged_attention.direct_kernels): one SDPA call per
    # request over only the tokens it has, reading the lengths on the host (free on CPU). Where a graph
    # records the op, the masked kernel above serves; this one is 10x to 400x faster eagerly, since the masked
    # one scores every slot of the block tables for every tile.
    _check_out(q, out)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    offsets_in_block = torch.arange(block_size, device=q.device)
    live_tokens = 0
    for request in prefill_layout(num_tokens, block_size, block_tables, query_lens, seq_lens):
        query_len, seq_len, first = request.query_len, request.seq_len, request.first_token
        blocks = block_tables[request.index, : -(-seq_len // block_size)].long()
        slots = (blocks[:, None] * block_size + offsets_in_block).reshape(-1)[:seq_len]
        # Each KV head repeated for its group of query heads ([num_heads, seq_len, head_dim]): the float32
        # copy is made anyway, and one head per query head keeps the causal mask structured (below).
        keys = flat_keys.index_select(0, slots).float().transpose(0, 1).repeat_interleave(group, dim=0)
        values = flat_values.index_select(0, slots).float().transpose(0, 1).repeat_interleave(group, dim=0)
        queries = q[first : first + query_len].float().transpose(0, 1)  # [num_heads, query_len, head_dim]
        # Causal from the context on: query j sits at position context_len + j and sees keys 0 .. that, which
        # is a causal mask aligned bottom-right (SDPA's is_causal aligns it top-left, only right without a
        # context). As a CausalBias rather than a dense mask, CUDA runs it in a fused kernel; a dense mask
        # fell back to the unfused math path, about 2x slower for 8 x 512 tokens on an H100.
        attended = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=causal_lower_right(query_len, seq_len), scale=scale
        )
        out[first : first + query_len] = attended[0].transpose(0, 1)
        live_tokens = first + query_len
    out[live_tokens:].zero_()  # padded tokens attend to nothing; zeros keep whatever follows finite


@functools.cache
def _triton_paged_prefill_attention() -> Callable[..., None]:
    # Imported on the first CUDA call so that `import graphhal.paged_attention` needs neither triton nor CUDA.
    from graphhal.paged_attention.triton_prefill_attention import paged_prefill_attention

    return paged_prefill_attention


def _check_out(q: torch.Tensor, out: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, num_heads, head_dim], got shape {tuple(q.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")


npu_decode_attention.register_npu_kernel(prefill_attention, npu_prefill_attention.prefill_attention_npu)

_prefill_attention_op = torch.ops.graphhal.prefill_attention.default
# npu tensors never get here from the model: npu_prefill_attention.calls_npu_directly routes them first.
_DIRECT_KERNELS = {"cpu": _prefill_attention_by_request, "cuda": _prefill_attention_cuda}


def _prefill_attention_step(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:  # type: ignore[no-untyped-def]
    # The op, or its kernel directly when nothing watches the call (graphhal.paged_attention.direct_kernels).
    if unobserved_eager_call(q):
        kernel = _DIRECT_KERNELS.get(q.device.type)
        if kernel is not None:
            return kernel(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out)
    return _prefill_attention_op(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out)


# What the model calls. In a breakable capture it is the break: it runs eagerly between captured segments. In a
# full capture it is captured inline where the device's kernel allows (required=False, and the declaration
# below): the CPU and CUDA kernels read every length from device memory, and the npu device updates the NPU
# kernel's host lengths before every replay.
prefill_attention_break = hal.break_point(
    npu_prefill_attention.calls_npu_directly(_prefill_attention_step), name="graphhal.prefill_attention", required=False
)

# The CPU and CUDA kernels can be captured in any batch, prefill chunks and decodes mixed, and so can the NPU
# one (its host lengths are updated before every replay); the reference (any other device) reads the lengths
# on the host, so it cannot be captured at all.
hal.declare_graph_support(_prefill_attention_op, hal.GraphSupport.NEVER)
hal.declare_graph_support(_prefill_attention_op, hal.GraphSupport.ANY_BATCH, device_types=["cpu", "cuda", "npu"])

# Piecewise graphs split here: the op writes into `out`, so the pieces around it keep fixed addresses.
hal.register_splitting_op(torch.ops.graphhal.prefill_attention.default)
