"""A ``DecodeRunner`` and a ``PrefillRunner`` for a transformers causal LM over a paged KV cache.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    kv_cache = paged_kv_cache(model, num_blocks=4096, max_seq_len=4096)
    prefill = prefill_runner(model, kv_cache, "cuda", PrefillConfig(max_tokens=2048))
    prefill.capture()             # the larger graphs first: the decode graphs then fit in their memory
    decode = decode_runner(model, kv_cache, "cuda", DecodeConfig(max_bs=64), pool=prefill.pool)
    decode.capture()

The model is switched to graphhal attention (``use_graphhal_attention``) and called through the steps of
``graphhal.transformers.steps``; the slots are the reference model's, so batches are built the same way
(``graphhal.transformers.generation`` builds them for a generation loop). Any mode the device offers
works; ``auto`` (the default) picks it from the attention ops' declared graph support, as for the reference
model. The model's parameters and the cache are watched: a runner refuses to replay after either moved.

Before a runner is built, the model is checked: every decoder layer must be one graphhal serves
(``graphhal.transformers.layers``), and a mixture-of-experts model's experts must keep their routing on the
device in the steps the runner captures (``graphhal.transformers.experts``). What fails is refused with
``UnsupportedModelError``, naming the layer or the experts and what to change.
"""

from __future__ import annotations

from typing import Any

import torch

import hal
from graphhal.transformers.attention import use_graphhal_attention
from graphhal.transformers.experts import check_experts_capturable
from graphhal.transformers.steps import DecodeStep, PrefillRowsStep, PrefillStep
from graphhal.paged_attention.decode_inputs import decode_input_slots
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.paged_attention.prefill_inputs import PREFILL_ROW_OUTPUTS, logits_rows_slot, prefill_request_slots, prefill_token_slots
from graphhal.sampling import DEFAULT_MAX_TOP_K, SampledPrefillStep, SampledStep
from graphhal.speculative.verify import GreedyVerifyStep
from runners import DecodeConfig, DecodeRunner, PrefillConfig, PrefillRunner


def decode_runner(
    model: torch.nn.Module,
    kv_cache: PagedKVCache,
    device: "str | hal.Device",
    config: DecodeConfig | None = None,
    *,
    sampling: bool = True,
    max_top_k: int = DEFAULT_MAX_TOP_K,
    greedy_verify: bool = False,
    **runner_options: Any,
) -> DecodeRunner:
    """Decode steps of ``model`` (one new token per request, or ``config.query_tokens`` for a speculative verify
    step) over ``kv_cache``; ``runner_options`` go to ``DecodeRunner`` (``pool``, ``group``...).

    sampling:  the step samples inside its graphs and returns ``{"tokens", "logprobs"}``, one row per request,
               taking the sampling slots besides the model's (``graphhal.sampling``); False: it returns the logits
               ([requests, vocab], or [requests, q, vocab] with ``query_tokens=q``).
    max_top_k: the largest top_k (and top-p's candidates) the graphs serve (``graphhal.sampling.SampledStep``).
    greedy_verify: with ``query_tokens = 1 + k``, the step verifies the batch's drafts (``input_ids[:, 1:]``)
               greedily on the device and returns ``{"accepted", "tokens", "num_tokens"}``
               (``graphhal.speculative.GreedyVerifyStep``); ``sampling`` must then be False.
    """
    config = config or DecodeConfig()
    if (greedy_verify or (config.query_tokens > 1 if isinstance(config, DecodeConfig) else False)) and sampling:
        raise ValueError(
            "decode_runner: a step of several query tokens per request is verified, not sampled: pass sampling=False "
            "(logits [requests, q, vocab]) or greedy_verify=True with sampling=False"
        )
    if greedy_verify and isinstance(config, DecodeConfig) and config.query_tokens < 2:
        raise ValueError("decode_runner: greedy_verify needs DecodeConfig(query_tokens=1 + k) with k >= 1 drafts per request")
    device = _device_of(model, kv_cache, device, config)
    slots = decode_input_slots(kv_cache.config, conventions=device.conventions, query_tokens=config.query_tokens)
    step: Any = DecodeStep(model, kv_cache)
    if greedy_verify:
        step = GreedyVerifyStep(step)
    if sampling:
        step = SampledStep(step, max_top_k=max_top_k)
        slots = step.input_slots(slots)
    return DecodeRunner(step, slots, device, config, watched_tensors=_watched(model, kv_cache), **runner_options)


def prefill_runner(
    model: torch.nn.Module,
    kv_cache: PagedKVCache,
    device: "str | hal.Device",
    config: PrefillConfig | None = None,
    *,
    sampling: bool = True,
    max_top_k: int = DEFAULT_MAX_TOP_K,
    logits: str | None = None,
    **runner_options: Any,
) -> PrefillRunner:
    """Prefill steps of ``model`` (packed prompt chunks after each request's cached context) over ``kv_cache``;
    ``runner_options`` go to ``PrefillRunner``.

    sampling:  each request samples at its chunk's last token (the request slot ``sample_rows`` names the row)
               inside the graphs, and the step returns ``{"tokens", "logprobs"}`` with one row per request
               (``graphhal.sampling.SampledPrefillStep``); False: it returns logits (see ``logits``).
    max_top_k: as for ``decode_runner``.
    logits:    "rows": the model's head runs only at the rows that need it: the sampled rows (the default with
               sampling), or without sampling the request slot ``logits_rows`` (each request's last token, say),
               and the step returns ``{"logits": [requests, vocab]}``. "all" (the default without sampling):
               every token's logits, [tokens, vocab] (prompt log-probabilities need them), at every token's
               cost in graph memory: 0.5 GB of pool at 2048 tokens and a 128k vocabulary in bfloat16.
    """
    logits = logits or ("rows" if sampling else "all")
    if logits not in ("rows", "all"):
        raise ValueError(f"prefill_runner: logits must be 'rows' or 'all', got {logits!r}")
    config = config or PrefillConfig()
    device = _device_of(model, kv_cache, device, config)
    token_slots = [slot.for_device(device.conventions) for slot in prefill_token_slots()]
    request_slots = [slot.for_device(device.conventions) for slot in prefill_request_slots(kv_cache.config)]
    rows = logits == "rows"
    step: Any = PrefillRowsStep(model, kv_cache) if rows else PrefillStep(model, kv_cache)
    if sampling:
        step = SampledPrefillStep(step, max_top_k=max_top_k, logits_rows=rows)
        request_slots = step.request_slots(request_slots)
        runner_options.setdefault("request_outputs", SampledPrefillStep.OUTPUTS)
    elif rows:
        request_slots = [*request_slots, logits_rows_slot()]
        runner_options.setdefault("request_outputs", PREFILL_ROW_OUTPUTS)
    return PrefillRunner(
        step, token_slots, request_slots, device, config, watched_tensors=_watched(model, kv_cache), **runner_options,
    )


def _device_of(
    model: torch.nn.Module, kv_cache: PagedKVCache, device: "str | hal.Device", config: DecodeConfig | PrefillConfig
) -> hal.Device:
    device = device if isinstance(device, hal.Device) else hal.get_device(device)
    parameter = next(model.parameters())
    if parameter.device != device.torch_device or kv_cache.device != device.torch_device:
        raise ValueError(
            f"the model is on {parameter.device} and the KV cache on {kv_cache.device}; the runner's device is "
            f"{device.torch_device}: move them there first"
        )
    if kv_cache.dtype != parameter.dtype:
        raise ValueError(f"the KV cache is {kv_cache.dtype} and the model {parameter.dtype}: build the cache in the model's dtype")
    use_graphhal_attention(model, kv_cache.config.max_seq_len)
    if isinstance(config, (DecodeConfig, PrefillConfig)):  # anything else: the runner's TypeError says so
        check_experts_capturable(model, device, config)
    return device


def _watched(model: torch.nn.Module, kv_cache: PagedKVCache) -> dict[str, Any]:
    return {"model": model, "KV cache": kv_cache}
