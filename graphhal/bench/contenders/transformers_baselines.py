"""transformers' own decode step, the baselines of ``graphhal bench --model llama|qwen2|mistral``.

Both run the workload's ``baseline_model``: the same weights as the model graphhal drives, under
transformers' default attention (sdpa) and with transformers' own caches, one decode step per ``run()`` at
the batch's size:

- ``transformers eager``: the model called with its default cache (``DynamicCache``), as ``generate`` does
  without options; the cache is cropped back after each step, so every step sees the same context;
- ``transformers static+compile``: transformers' recommended fast path: a ``StaticCache`` and the forward
  compiled with ``torch.compile(mode="reduce-overhead")`` (what ``generate`` does with
  ``cache_implementation="static"``; here with ``fullgraph=True``, which its forward allows, where
  transformers' ``CompileConfig`` leaves graph breaks allowed); the cache is wound back every ``HEADROOM``
  steps. CUDA only, as reduce-overhead.

transformers' caches hold one length for every row, so each row's context is the batch's mean context length
(the same number of cached tokens as graphhal's rows attend to in total). Their outputs are not compared with
eager's (another context, random tokens in it): these rows are timings only.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

import hal
from graphhal.bench.contenders.contender import Batch, Contender, Prepared
from graphhal.bench.contenders.reduce_overhead import ReduceOverhead, cudagraph_skips, recompile_limit_at_least
from graphhal.bench.names import TRANSFORMERS_EAGER, TRANSFORMERS_STATIC_COMPILE
from graphhal.bench.workload import Workload


class TransformersEager(Contender[Batch]):
    name = TRANSFORMERS_EAGER
    detail = "transformers' decode step with its default attention and DynamicCache, eager"

    def prepare(self, workload: Workload, batch: Batch) -> Prepared:
        model, token, position, context = _decode_inputs(workload, batch)
        keyword = _cache_keyword(model)
        with torch.no_grad():
            cache = _cache_of(model(input_ids=_context_tokens(model, token, context), use_cache=True))

        def run() -> torch.Tensor:
            logits = model(input_ids=token, position_ids=position, use_cache=True, **{keyword: cache}).logits
            cache.crop(-1)  # drop the step's token: every step sees the same context
            return logits[:, -1]

        return Prepared(run=run, compares=False)


class TransformersStaticCompile(Contender[Batch]):
    name = TRANSFORMERS_STATIC_COMPILE
    detail = "transformers' decode step with StaticCache and torch.compile(mode='reduce-overhead', fullgraph=True)"

    def skip_reason(self, device: hal.Device) -> str | None:
        return ReduceOverhead().skip_reason(device)

    def prepare(self, workload: Workload, batch: Batch) -> Prepared:
        import transformers

        model, token, position, context = _decode_inputs(workload, batch)
        keyword = _cache_keyword(model)
        started = time.perf_counter()
        # A static cache writes each step at its own running length (a device counter per layer), as
        # generate's loop does: it is given HEADROOM positions past the context, and wound back to the
        # context every HEADROOM steps (one small write per layer, outside the compiled step), so the steps
        # timed see a context between the batch's mean and HEADROOM more. Attention reads the whole static
        # length, masked, whatever the position.
        cache = transformers.StaticCache(config=model.config, max_cache_len=context + HEADROOM)
        with torch.no_grad():
            model(input_ids=_context_tokens(model, token, context), use_cache=True, **{keyword: cache})
        lengths = [layer.cumulative_length for layer in cache.layers if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        if not lengths:
            raise TypeError("this transformers' StaticCache keeps no per-layer cumulative_length to wind back")
        compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        steps = 0

        def run() -> torch.Tensor:
            nonlocal steps
            if steps == HEADROOM:
                for length in lengths:
                    length.fill_(context)
                steps = 0
            steps += 1
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
            with torch.no_grad():
                output = compiled(input_ids=token, position_ids=position, use_cache=True, **{keyword: cache})
            return output.logits[:, -1]

        # Compile, record the CUDA graph, replay: setup. Every batch size of a run compiles the same forward
        # again (new cache shapes), so the recompile limit grows with them; a skipped CUDA graph is an error,
        # not a row timing Inductor without graphs under this name (as for reduce-overhead).
        skips = cudagraph_skips()
        with recompile_limit_at_least(64):
            for _ in range(3):
                run()
        workload.device.synchronize()
        if cudagraph_skips() > skips:
            raise RuntimeError("torch.compile skipped CUDA graphs for transformers' step (its warning above says why)")
        return Prepared(run=run, setup_s=time.perf_counter() - started, compares=False)


HEADROOM = 64


def _decode_inputs(workload: Workload, batch: Batch) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """The baseline model, the batch's tokens [rows, 1], their positions, and the context every row gets."""
    model = getattr(workload, "baseline_model", None)
    if model is None:
        raise TypeError("the transformers baselines need a transformers workload (graphhal bench --model llama|qwen2|mistral)")
    token = batch["input_ids"].reshape(-1, 1)
    context = max(1, round(batch["seq_lens"].float().mean().item()) - 1)  # seq_lens count the new token
    position = torch.full_like(token, context)
    return model, token, position, context


def _context_tokens(model: Any, token: torch.Tensor, context: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (token.shape[0], context), generator=generator)
    return ids.to(token.device)


def _cache_keyword(model: Any) -> str:
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name is deprecated, warned).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
