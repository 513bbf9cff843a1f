"""A transformers model's verify step: ``q`` tokens per request through graphhal's attention, on graphs.

The logits of a verify step over ``q`` tokens after a cached context must be transformers' own logits at those
positions of the whole sequence (its attention, its causal mask): the paged attention's causal lengths among
the new tokens are exactly a causal mask's. Checked in every mode, and through ``decode_runner(...,
greedy_verify=True)``, whose graph returns the verdict.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.paged_attention import PagedKVCache  # noqa: E402
from graphhal.speculative import greedy_tokens, greedy_verify  # noqa: E402
from graphhal.transformers import decode_runner, paged_kv_cache  # noqa: E402
from graphhal.transformers.attention import use_graphhal_attention  # noqa: E402
from graphhal.transformers.steps import DecodeStep  # noqa: E402
from runners import DecodeConfig  # noqa: E402
from support.transformers_models import build_model, skip_where_torch_cannot_compile_the_model  # noqa: E402

PROMPT_LEN = 6
QUERY_TOKENS = 3
BLOCK_SIZE = 16


def _requests(cache: PagedKVCache, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two steps over ``tokens`` [requests, PROMPT_LEN + QUERY_TOKENS]: the prompt as one step of PROMPT_LEN
    query tokens from an empty context (a causal prefill), then the verify step over the last QUERY_TOKENS.
    On the cache's device."""
    device = cache.device
    requests = tokens.shape[0]
    blocks = [cache.allocator.allocate(1) for _ in range(requests)]
    tables = torch.zeros(requests, cache.config.max_blocks_per_seq, dtype=torch.int32)  # the null block past the first
    tables[:, 0] = torch.tensor([block[0] for block in blocks], dtype=torch.int32)
    slots = torch.tensor([[block[0] * BLOCK_SIZE + i for i in range(tokens.shape[1])] for block in blocks])
    positions = torch.arange(tokens.shape[1]).expand(requests, -1)

    def step(first: int, last: int) -> dict[str, torch.Tensor]:
        step = {
            "input_ids": tokens[:, first:last],
            "positions": positions[:, first:last],
            "seq_lens": torch.full((requests,), last, dtype=torch.int32),
            "block_tables": tables,
            "slot_mapping": slots[:, first:last],
        }
        return {name: value.contiguous().to(device) for name, value in step.items()}

    return step(0, PROMPT_LEN), step(PROMPT_LEN, PROMPT_LEN + QUERY_TOKENS)


CASES = [
    *(pytest.param("cpu", mode, marks=pytest.mark.cpu) for mode in ("disabled", "full", "breakable", "piecewise", "auto")),
    *(pytest.param("cuda", mode, marks=pytest.mark.cuda) for mode in ("full", "piecewise")),
]


@pytest.mark.parametrize("device, mode", CASES)
def test_verify_logits_equal_transformers_on_the_whole_sequence(device, mode):
    skip_where_torch_cannot_compile_the_model(mode, None)
    reference = build_model("llama", device)  # transformers' attention (sdpa) and its causal mask
    model = build_model("llama", device)  # the same seeded weights, switched to graphhal's attention
    tokens = torch.randint(0, 512, (3, PROMPT_LEN + QUERY_TOKENS), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        expected = reference(input_ids=tokens).logits[:, PROMPT_LEN:]
        cache = paged_kv_cache(model, num_blocks=8, block_size=BLOCK_SIZE, max_seq_len=64)
        use_graphhal_attention(model, 64)
        prompt, verify = _requests(cache, tokens)
        DecodeStep(model, cache)(**prompt)  # fills the cache: a step of PROMPT_LEN query tokens
        config = DecodeConfig(mode=mode, buckets=[2, 4], query_tokens=QUERY_TOKENS, show_progress=False)
        runner = decode_runner(model, cache, device, config, sampling=False)
        runner.capture()
        logits = runner.run(verify)
    assert logits.shape == (3, QUERY_TOKENS, 512)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_decode_runner_returns_the_greedy_verdict():
    reference = build_model("llama")
    model = build_model("llama")
    tokens = torch.randint(0, 512, (2, PROMPT_LEN + QUERY_TOKENS), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        # Make request 0's drafts the reference's own greedy continuation (accepts all), request 1's random.
        for j in range(PROMPT_LEN + 1, PROMPT_LEN + QUERY_TOKENS):
            tokens[0, j] = reference(input_ids=tokens[:1, :j]).logits[0, -1].argmax()
        expected = greedy_verify(greedy_tokens(reference(input_ids=tokens).logits[:, PROMPT_LEN:]), tokens[:, PROMPT_LEN + 1 :])
        cache = paged_kv_cache(model, num_blocks=8, block_size=BLOCK_SIZE, max_seq_len=64)
        use_graphhal_attention(model, 64)
        prompt, verify = _requests(cache, tokens)
        DecodeStep(model, cache)(**prompt)
        config = DecodeConfig(mode="full", buckets=[2], query_tokens=QUERY_TOKENS, show_progress=False)
        runner = decode_runner(model, cache, "cpu", config, sampling=False, greedy_verify=True)
        runner.capture()
        out = runner.run(verify)
    assert out["accepted"].tolist()[0] == QUERY_TOKENS - 1
    for name, value in zip(("accepted", "tokens", "num_tokens"), expected):
        assert torch.equal(out[name], value), name


def test_decode_runner_refuses_to_sample_a_verify_step():
    model = build_model("llama")
    cache = paged_kv_cache(model, num_blocks=8, block_size=BLOCK_SIZE, max_seq_len=64)
    with pytest.raises(ValueError, match="sampling=False"):
        decode_runner(model, cache, "cpu", DecodeConfig(query_tokens=3))
    with pytest.raises(ValueError, match="query_tokens=1 \\+ k"):
        decode_runner(model, cache, "cpu", DecodeConfig(), sampling=False, greedy_verify=True)
