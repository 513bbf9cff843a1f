"""What each torch_npu line documents for ``npu_fused_infer_attention_score`` over a paged KV cache, and the route
the reference model's npu attention takes from it.

The limits are op-plugin's operator document (docs/context/torch_npu-npu_fused_infer_attention_score.md) at the
commit each torch_npu line pins: 480bc431 (7.1), 691bf15a (7.2), 7213914d (7.3; dedc3167, 26.0, says the same
for what is used here). Read there:

- Packed layout ``TND`` without rope ("TND、TND_NTD、NTD_TND场景下query、key、value输入的综合限制"):
  7.1: Q_D = K_D = 192 (V_D 128 or 192), Q_N = K_N = V_N, bfloat16 only, no page attention, not with graph
  mode (reduce-overhead); 7.2: Q_D = K_D = V_D = 128, or Q_D = K_D = 192; bfloat16 only; still no page
  attention and no graph mode; 7.3: Q_D = K_D = V_D = 128, or 192; "page attention场景下仅支持blocksize为16对齐且
  小于等于1024", no dtype or graph-mode restriction left. So TND over a paged cache (every prefill of this
  model, and vllm-ascend's decode from 2.8 on) is documented from 7.3 only.
- Incremental branch (Q_S = 1, layouts ``BSH``/``BSND``) with page attention, on every line: ``block_size``
  16-aligned for float16/bfloat16 (and, from 7.2, at most 512), D at most 512, KV cache as
  (blocknum, blocksize, H), "blocknum不能小于根据actual_seq_lengths_kv和blockSize计算的每个batch的block数量之和".

The route (``decode_route``, ``prefill_route``): the fused op in ``TND`` where the line documents it for the
call's shapes (vllm-ascend's route: ``full_graph_fia``, attention_v1.py, main 182b75ea); for decode, ``BSH``
where only the incremental branch is documented (7.1 and 7.2, or a head dim TND does not take); otherwise the
graph-safe torch kernels every device can run (``decode_attention_reference``, ``prefill_attention_masked``),
which read no length on the host, so they are captured like any other op, at the cost of scoring the whole
block table. Each fallback is logged once with its reason and what would lift it, and recorded
(``fallbacks_taken``) for the bench to show.

The line is told by the API a build has, as the npu device does (devices/npu/runtime.py): the
``_infer_output`` helpers exist from 7.3, FIA v2 from 7.2. Never by the version string.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

FUSED_DTYPES = (torch.float16, torch.bfloat16)
INCREMENTAL_MAX_HEAD_DIM = 512  # "支持D轴小于等于512" (Q_S = 1), every line


@dataclass(frozen=True)
class FusedAttentionLine:
    """What one torch_npu line's op-plugin documents for the fused infer-attention op (module docstring).

    name:                  the line as errors and logs say it.
    op_plugin:             the op-plugin commit the line pins, whose document this is.
    tnd_page_attention:    TND takes a paged KV cache (block_table).
    tnd_head_dims:         head dims TND takes without rope (query, key and value alike).
    tnd_dtypes:            dtypes TND takes.
    tnd_max_block_size:    the largest block_size TND with page attention takes (16-aligned).
    paged_max_block_size:  the largest block_size the incremental branch takes with page attention (16-aligned);
                           None where the document names no maximum.
    """

    name: str
    op_plugin: str
    tnd_page_attention: bool
    tnd_head_dims: tuple[int, ...]
    tnd_dtypes: tuple[torch.dtype, ...]
    tnd_max_block_size: int | None
    paged_max_block_size: int | None


LINE_7_1 = FusedAttentionLine("7.1", "480bc431", False, (192,), (torch.bfloat16,), None, None)
LINE_7_2 = FusedAttentionLine("7.2", "691bf15a", False, (128, 192), (torch.bfloat16,), None, 512)
LINE_7_3 = FusedAttentionLine("7.3 on", "7213914d", True, (128, 192), FUSED_DTYPES, 1024, 512)


def fused_attention_line(torch_npu: Any) -> FusedAttentionLine:
    """The line of the installed ``torch_npu`` module, told by its API (module docstring)."""
    if hasattr(torch_npu, "_npu_fused_infer_attention_score_infer_output"):
        return LINE_7_3
    if hasattr(torch_npu, "npu_fused_infer_attention_score_v2"):
        return LINE_7_2
    return LINE_7_1


@dataclass(frozen=True)
class Route:
    """How one npu attention call runs: ``layout`` "TND" or "BSH" (the fused op), or None (the graph-safe torch
    kernel), and ``reason``, why not the preferred route (empty when it is)."""

    layout: str | None
    reason: str = ""


def _tnd_problem(line: FusedAttentionLine, head_dim: int, block_size: int, dtype: torch.dtype) -> str:
    """Why this line documents no TND over a paged cache for these shapes; empty when it does."""
    where = f"torch_npu {line.name} (op-plugin {line.op_plugin})"
    if not line.tnd_page_attention:
        return f"{where} documents no page attention in layout TND (from 7.3 on, op-plugin 7213914d, it does)"
    if head_dim not in line.tnd_head_dims:
        dims = " or ".join(map(str, line.tnd_head_dims))
        return f"{where} takes a head dim of {dims} in layout TND without rope, not {head_dim}"
    if block_size % 16 or line.tnd_max_block_size is not None and block_size > line.tnd_max_block_size:
        return f"{where} takes a block_size 16-aligned up to {line.tnd_max_block_size} in layout TND, not {block_size}"
    if dtype not in line.tnd_dtypes:
        return f"{where} takes {', '.join(map(str, line.tnd_dtypes))} in layout TND, not {dtype}"
    return ""


def _incremental_problem(line: FusedAttentionLine, head_dim: int, block_size: int) -> str:
    """Why this line documents no incremental (BSH) branch over a paged cache for these shapes; empty when it does."""
    where = f"torch_npu {line.name} (op-plugin {line.op_plugin})"
    if not block_size or block_size % 16 or line.paged_max_block_size is not None and block_size > line.paged_max_block_size:
        most = f" up to {line.paged_max_block_size}" if line.paged_max_block_size else ""
        return f"{where} takes a paged cache's block_size 16-aligned{most} (float16/bfloat16), not {block_size}"
    if head_dim > INCREMENTAL_MAX_HEAD_DIM:
        return f"{where} takes a head dim of at most {INCREMENTAL_MAX_HEAD_DIM} with one query token, not {head_dim}"
    return ""


def decode_route(torch_npu: Any, head_dim: int, block_size: int, dtype: torch.dtype, query_tokens: int = 1) -> Route:
    """TND (vllm-ascend's tested decode route) where documented, else BSH, else the torch kernel. Several query
    tokens per request (a verify step) go in layout BSH only, within its paged-cache limits, else the torch kernel
    (TND's larger blocks do not carry over to BSH)."""
    line = fused_attention_line(torch_npu)
    if query_tokens > 1:
        why_not_bsh = _incremental_problem(line, head_dim, block_size)
        if not why_not_bsh:
            return Route("BSH", "a verify step (several query tokens per request) in layout BSH")
        most = line.paged_max_block_size or 1024
        return _fallback("verify", why_not_bsh, f"blocks of 16n tokens up to {most} and a head dim of at most {INCREMENTAL_MAX_HEAD_DIM}")
    why_not_tnd = _tnd_problem(line, head_dim, block_size, dtype)
    if not why_not_tnd:
        return Route("TND")
    why_not_bsh = _incremental_problem(line, head_dim, block_size)
    if not why_not_bsh:
        return Route("BSH", f"decode in layout BSH, not TND: {why_not_tnd}")
    return _fallback(
        "decode", f"{why_not_tnd}; and {why_not_bsh}",
        "a model with blocks of 16 to 512 tokens, and a head dim of 128 or 192 on torch_npu 7.3 or later",
    )


def prefill_route(torch_npu: Any, head_dim: int, block_size: int, dtype: torch.dtype) -> Route:
    """TND where documented, else the graph-safe torch kernel (the fused op's other layouts take no packed batch)."""
    line = fused_attention_line(torch_npu)
    problem = _tnd_problem(line, head_dim, block_size, dtype)
    if not problem:
        return Route("TND")
    shapes = "a head dim of 128 or 192 and blocks of 16n tokens up to 1024"
    lift = shapes if line.tnd_page_attention else f"torch_npu 7.3 or later (pip torch-npu 2.6.0.post5 on) and {shapes}"
    return _fallback("prefill", problem, lift)


# Fallbacks taken in this process, phase -> reason: logged once each, and read by the bench for its notes.
_fallbacks: dict[str, str] = {}


def _fallback(phase: str, reason: str, lift: str) -> Route:
    message = (
        f"npu {phase} attention runs graphhal's graph-safe torch kernel instead of torch_npu's fused "
        f"infer-attention op: {reason}. It is correct and capturable, but scores every block of the block table; "
        f"for the fused op use {lift}"
    )
    if _fallbacks.get(phase) != message:
        _fallbacks[phase] = message
        logger.warning("graphhal: %s", message)
    return Route(None, message)


def fallbacks_taken() -> list[str]:
    """Every fallback this process's npu attention took (one sentence each, with the reason and the remedy)."""
    return list(_fallbacks.values())
