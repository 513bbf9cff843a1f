"""The npu kernel of ``graphhal::decode_attention``: torch_npu's fused infer-attention op over the paged cache.

``npu_fused_infer_attention_score`` takes the per-request lengths as a host list (``actual_seq_lengths_kv``),
which a captured NPU graph bakes in; graphhal's npu device updates them before every replay. The route is what
the installed torch_npu line documents for the model's shapes (``npu_fused_attention_limits``): layout ``TND``
(query ``[B, N, D]`` as B requests of one token each, cumulative query ends ``1..B``; vllm-ascend's decode route
from 2.8 on) from torch_npu 7.3 with a head dim of 128 or 192; else layout ``BSH`` (the incremental branch,
documented on every line for blocks of 16n tokens); else the graph-safe reference kernel. Several query tokens
per request (a speculative verify step, q ``[batch, query_tokens, heads, head_dim]``) go in as the BSH sequence
dimension with sparse_mode 3 (causal from the cached context on) wherever the line has a route, TND included:
the simulator checks that form, not TND's packed multi-token decode. No op-plugin document covers this
combination (page attention, BSH with S > 1, sparse_mode 3: the FIA document sends S > 1 to the
PromptFlashAttention branch and documents page attention for the incremental one); it is checked on the
simulator only, which refuses a KV length below S there. Rules that follow:

- While an NPU graph is being captured, the device lengths cannot be read back (``.tolist()`` would sync with
  a stream that is only recording): the capture gets placeholder lengths of ``query_tokens`` (1 for a plain
  decode; valid for the op's check that the cache holds the blocks the lengths need, and never below the
  query's S in sparse_mode 3), which the update replaces before any replay. Padded rows of a multi-token step
  get the same length (``decode_input_slots``'s fill): they attend to their own tokens in the null block. The workspace
  the npu device allocates covers any length the block tables allow (the op's "max workspace").
- Outside a capture the lengths are read on the host once per step (``hal.host_list``), not once per layer.
- The fused op must be called where the npu device's capture sees it (a dispatch mode). A call made inside a
  custom op's kernel is hidden from every dispatch mode, so its lengths could never be updated.
  ``calls_npu_directly`` therefore routes npu tensors to this kernel before the custom op is entered (outside
  torch.compile, where the custom op must stay opaque so graphs can be split at it); the custom op's npu
  kernel (``register_npu_kernel``) serves compiled and eager calls, which is why the npu device refuses
  ``full`` graphs of an Inductor-compiled forward.

Follows op-plugin's signature, the same on every torch_npu line from 7.1 (op_plugin_functions.yaml); the op
takes float16 or bfloat16 only.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

import hal
from graphhal.paged_attention.decode_attention_reference import decode_attention_reference
from graphhal.paged_attention.npu_fused_attention_limits import decode_route

# The torch device type npu tensors have. A simulator of torch_npu that keeps them on another device (the
# tests' CPU simulator) says so with ``npu_tensors_on``.
_npu_tensor_type = "npu"
_FUSED_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
RIGHT_DOWN_CAUSAL = 3  # sparse_mode: each request causal from its cached context on
CAUSAL_MASK_SIZE = 2048  # sparse_mode 3 takes this fixed "optimized" mask, whatever the lengths
# One mask per device, made outside any capture and kept for the process, as vllm-ascend keeps it (a mask made
# inside a capture would live in the graph's pool, which later captures reuse).
_causal_masks: dict[torch.device, torch.Tensor] = {}


class MaskInCaptureError(hal.GraphHalError, RuntimeError):
    """The first multi-token npu attention call of a device came inside a graph capture, where its mask cannot be
    made."""


def is_npu_tensor(tensor: torch.Tensor) -> bool:
    return tensor.device.type == _npu_tensor_type and "torch_npu" in sys.modules


@contextmanager
def npu_tensors_on(device_type: str) -> Iterator[None]:
    """Within the block, tensors of ``device_type`` count as npu tensors (for simulators of torch_npu)."""
    global _npu_tensor_type
    previous, _npu_tensor_type = _npu_tensor_type, device_type
    try:
        yield
    finally:
        _npu_tensor_type = previous


def decode_attention_npu(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """``graphhal::decode_attention`` through ``torch_npu.npu_fused_infer_attention_score`` (same arguments)."""
    torch_npu = fused_attention_module(q, "decode")
    # [batch, num_heads, head_dim] (one token per request), or [batch, query_tokens, ...] (speculative verify)
    batch, query_tokens, num_heads, head_dim = q.shape if q.dim() == 4 else (q.shape[0], 1, *q.shape[1:])
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    route = decode_route(torch_npu, head_dim, block_size, q.dtype, query_tokens)
    if route.layout is None:
        out.copy_(decode_attention_reference(q, key_cache, value_cache, block_tables, seq_lens, scale))
        return
    if torch.npu.is_current_stream_capturing():
        # placeholders, replaced by the update before any replay: a request's KV length counts its query tokens
        lengths = [query_tokens] * batch
    else:
        lengths = hal.host_list(seq_lens)
    # Several query tokens per request: BSH with S = query_tokens, causal among them from the cached context on
    # (sparse_mode 3, rightDownCausal, with the fixed triangular mask it takes): token i sees the first
    # seq_len - (query_tokens - 1 - i) KV tokens. The KV lengths stay per request, so the device's update of
    # a graph's lengths is the same as for one token.
    causal = {"atten_mask": causal_mask(q.device), "sparse_mode": RIGHT_DOWN_CAUSAL} if query_tokens > 1 else {}
    packed = route.layout == "TND" and query_tokens == 1
    # TND: one token per request, as cumulative query ends (the npu device's updates keep them).
    query_ends = {"actual_seq_lengths": list(range(1, batch + 1))} if packed else {}
    attention, _ = torch_npu.npu_fused_infer_attention_score(
        q.contiguous() if packed else q.reshape(batch, query_tokens, num_heads * head_dim),
        key_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        value_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        block_table=block_tables,
        actual_seq_lengths_kv=lengths,
        num_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        scale=scale,
        input_layout="TND" if packed else "BSH",
        block_size=block_size,
        **causal,
        **query_ends,
    )
    out.copy_(attention.view(out.shape))


def causal_mask(device: torch.device) -> torch.Tensor:
    """The triangular mask sparse_mode 3 takes (1 above the diagonal; vllm-ascend's ``get_splitfuse_attn_mask``)."""
    mask = _causal_masks.get(device)
    if mask is None:
        if torch.npu.is_current_stream_capturing():
            raise MaskInCaptureError(
                "npu attention met its first multi-token call inside an NPU graph capture: its causal mask must be "
                "made outside it (run the forward eagerly once before capturing, as runners do)"
            )
        size = CAUSAL_MASK_SIZE
        mask = torch.triu(torch.ones(size, size), diagonal=1).to(torch.int8).to(device)
        _causal_masks[device] = mask
    return mask


def fused_attention_module(q: torch.Tensor, phase: str) -> Any:
    """``torch_npu``, once ``q``'s dtype is one its fused infer-attention op takes (TypeError otherwise)."""
    if q.dtype not in _FUSED_ATTENTION_DTYPES:
        raise TypeError(
            f"npu {phase} attention runs torch_npu's fused infer-attention op, which takes float16 or bfloat16; "
            f"the query is {q.dtype}: build the model and KV cache in one of those dtypes"
        )
    return sys.modules["torch_npu"]


def calls_npu_directly(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` (the decode attention custom op), except that npu tensors outside torch.compile run
    ``decode_attention_npu`` directly, where an NPU graph capture sees the fused op (module docstring)."""

    @functools.wraps(op)
    def decode_attention(q, key_cache, value_cache, block_tables, seq_lens, scale, out):  # type: ignore[no-untyped-def]
        if not torch.compiler.is_compiling() and is_npu_tensor(q):
            return decode_attention_npu(q, key_cache, value_cache, block_tables, seq_lens, scale, out)
        return op(q, key_cache, value_cache, block_tables, seq_lens, scale, out)

    return decode_attention


def register_npu_kernel(custom_op: Any, kernel: Callable[..., None]) -> None:
    """Register ``kernel`` as ``custom_op``'s npu kernel, once torch knows the npu backend (torch_npu renames
    PrivateUse1 to "npu" when it is imported; before that there is nothing to register)."""
    if torch._C._get_privateuse1_backend_name() == "npu":
        custom_op.register_kernel("npu")(kernel)
