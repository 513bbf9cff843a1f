"""Decode runners whose every request carries ``q = 1 + k`` query tokens: a speculative verify step on graphs.

What must hold, on the reference model: the verify step's logits for token ``i`` are what ``i + 1`` one-token
steps give; graph output equals eager output at q = 2..5 in every mode, for batches that pad; padding adds
whole requests, whose rows never come back and whose writes never reach a live request's KV; runners at
several ``q`` share one pool; mode ``auto`` reads ``UNIFORM_BATCH`` from the ops' declarations; and slots that
do not carry ``q`` tokens are refused, naming the slot.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import hal
from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner, InputSlot
from support.kv_cache_changes import cache_snapshot, changed_slots

CONFIG = ModelConfig.tiny()
BUCKETS = [1, 2, 4]
MODES = ["full", "breakable", "piecewise", "auto", "disabled"]


class Verifier:
    """The tiny reference model, its cache, ``requests`` requests with ``q - 1`` drafts each, and a runner."""

    def __init__(self, device: str, query_tokens: int, mode: str = "full", *, requests: int = 4, pool=None, cache=None, model=None, seed=0, compiler=None):
        self.kv_cache = cache or PagedKVCache(CONFIG, num_blocks=128, device=device, dtype=torch.float32)
        self.model = model or LlamaDecoder(CONFIG, device, torch.float32)
        self.step = self.model.decode_forward(self.kv_cache)
        self.workload = DecodeWorkload(
            self.kv_cache, requests, max_context_len=CONFIG.max_seq_len - 8, seed=seed, query_tokens=query_tokens
        )
        config = DecodeConfig(mode=mode, buckets=BUCKETS, query_tokens=query_tokens, compiler=compiler, show_progress=False)
        self.runner = DecodeRunner(self.step, self.workload.input_slots(), device, config, pool=pool, watched_tensors={"kv": self.kv_cache})

    def eager(self, rows: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.step(**self.workload.batch(rows)).clone()


@pytest.mark.parametrize("query_tokens", [2, 4])
def test_verify_step_logits_are_those_of_one_token_steps(query_tokens):
    """Token i of a verify step sees the context and the new tokens before it, as the i-th one-token step would."""
    verifier = Verifier("cpu", query_tokens, "disabled")
    batch = verifier.workload.batch()
    logits = verifier.eager(4)
    assert logits.shape == (4, query_tokens, CONFIG.vocab_size)
    one_token = []
    with torch.inference_mode():
        for i in range(query_tokens):
            step = {
                "input_ids": batch["input_ids"][:, i],
                "positions": batch["positions"][:, i],
                "seq_lens": batch["seq_lens"] - (query_tokens - 1 - i),
                "block_tables": batch["block_tables"],
                "slot_mapping": batch["slot_mapping"][:, i],
            }
            one_token.append(verifier.step(**step).clone())
    torch.testing.assert_close(logits, torch.stack(one_token, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("query_tokens", [2, 3, 4, 5])
def test_graph_output_equals_eager(graph_device, mode, query_tokens):
    verifier = Verifier(graph_device, query_tokens, mode)
    expected_mode = "full" if mode == "auto" else mode  # the decode attention allows uniform batches
    with torch.inference_mode():
        verifier.runner.capture()
        assert verifier.runner.config.mode == expected_mode
        for rows in (4, 3, 1, 2, 3):  # 3 pads one request in bucket 4, after a full batch left its rows there
            eager = verifier.eager(rows)
            graph = verifier.runner.run(verifier.workload.batch(rows))
            assert graph.shape == (rows, query_tokens, CONFIG.vocab_size)  # no padded request comes back
            torch.testing.assert_close(graph, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_graph_output_equals_eager_compiled_by_inductor_on_cuda(mode):
    """The step compiled once by Inductor with a dynamic request dimension (its token dimension is q times it),
    then captured per bucket."""
    verifier = Verifier("cuda", 3, mode, compiler="inductor")
    with torch.inference_mode():
        verifier.runner.capture()
        for rows in (4, 3, 1):
            eager = verifier.eager(rows)
            torch.testing.assert_close(verifier.runner.run(verifier.workload.batch(rows)), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_a_padded_request_writes_only_the_null_block(mode):
    """Three live requests in bucket 4: the fourth, padded, writes the null slot; every slot that changed is a
    live request's new token or in the null block. Request 3's slots are zeroed after the full batch left its
    inputs in row 3 of the buffers: a padded row that kept them (no refill) would write them again."""
    verifier = Verifier("cpu", 3, mode)
    request_3 = verifier.workload.batch(4)["slot_mapping"][3]
    with torch.inference_mode():
        verifier.runner.capture()
        verifier.runner.run(verifier.workload.batch(4))  # leaves a live request's inputs in row 3 of the buffers
        batch = verifier.workload.batch(3)
        verifier.runner.run(batch)  # the same values again: only what padding writes can change
        for cache in verifier.kv_cache.key_caches + verifier.kv_cache.value_caches:
            cache.view(-1, *cache.shape[2:])[request_3] = 0.0
        before = cache_snapshot(verifier.kv_cache)
        scrambled = {**batch, "input_ids": (batch["input_ids"] + 1) % CONFIG.vocab_size}
        out = verifier.runner.run(scrambled)
    live = set(batch["slot_mapping"].flatten().tolist())
    null_block = set(range(CONFIG.block_size))
    changed = changed_slots(verifier.kv_cache, before)
    assert changed and changed <= live | null_block
    assert not changed & set(request_3.tolist())  # request 3 untouched
    assert out.shape[0] == 3


def test_runners_at_several_query_tokens_share_one_pool(graph_device):
    """A plain decode runner and verify runners at q = 2 and 4, one pool, one cache, interleaved steps."""
    cache = PagedKVCache(CONFIG, num_blocks=192, device=graph_device, dtype=torch.float32)
    model = LlamaDecoder(CONFIG, graph_device, torch.float32)
    with torch.inference_mode():
        plain = Verifier(graph_device, 1, "full", cache=cache, model=model, seed=1)
        plain.runner.capture()
        verifiers = [plain]
        for query_tokens, seed in ((4, 2), (2, 3)):
            verifier = Verifier(graph_device, query_tokens, "full", pool=plain.runner.pool, cache=cache, model=model, seed=seed)
            verifier.runner.capture()
            assert verifier.runner.pool is plain.runner.pool
            verifiers.append(verifier)
        for rows in (3, 1, 4, 2):
            for verifier in verifiers:
                eager = verifier.eager(rows)
                torch.testing.assert_close(verifier.runner.run(verifier.workload.batch(rows)), eager)


# --- mode auto, from what the ops declare ------------------------------------------------------------------


def _scale(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2)


def _define(name: str, support: hal.GraphSupport) -> torch._ops.OpOverload:
    op = torch.library.custom_op(f"graphhal_spec_test::{name}", mutates_args=("out",))(_scale)
    op.register_fake(lambda x, out: None)
    overload = getattr(torch.ops.graphhal_spec_test, name).default
    hal.declare_graph_support(overload, support)
    hal.register_splitting_op(overload)
    return overload


DECODE_ONLY = _define("decode_only", hal.GraphSupport.UNIFORM_DECODE)
UNIFORM_BATCH = _define("uniform_batch", hal.GraphSupport.UNIFORM_BATCH)


def _calls(op: torch._ops.OpOverload):  # type: ignore[no-untyped-def]
    def step(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        op(x, out)
        return out

    return step


THROUGH_DECODE_ONLY = _calls(DECODE_ONLY)
THROUGH_UNIFORM_BATCH = _calls(UNIFORM_BATCH)


def _step_over_decode_only(input_ids: torch.Tensor) -> torch.Tensor:
    return THROUGH_DECODE_ONLY(input_ids.float() + 1)


def _step_over_uniform_batch(input_ids: torch.Tensor) -> torch.Tensor:
    return THROUGH_UNIFORM_BATCH(input_ids.float() + 1)


def _runner(step, query_tokens: int, mode: str) -> DecodeRunner:  # type: ignore[no-untyped-def]
    shape = (query_tokens,) if query_tokens > 1 else ()
    slots = [InputSlot("input_ids", torch.int64, row_shape=shape, per_token=True)]
    return DecodeRunner(step, slots, "cpu", DecodeConfig(mode=mode, buckets=[2, 4], query_tokens=query_tokens, show_progress=False))


@pytest.mark.parametrize(
    "step, query_tokens, chosen",
    [
        (_step_over_decode_only, 1, "full"),  # one token per request: what UNIFORM_DECODE allows
        (_step_over_decode_only, 3, "piecewise"),  # q > 1: not allowed, and it is a splitting op
        (_step_over_uniform_batch, 1, "full"),
        (_step_over_uniform_batch, 3, "full"),
    ],
)
def test_auto_chooses_from_the_declarations(step, query_tokens, chosen):
    runner = _runner(step, query_tokens, "auto")
    with torch.inference_mode():
        runner.capture()
        assert runner.config.mode == chosen
        ids = torch.arange(3 * query_tokens).reshape(3, query_tokens)
        batch = {"input_ids": ids if query_tokens > 1 else ids[:, 0]}
        torch.testing.assert_close(runner.run(batch), (batch["input_ids"].float() + 1) * 2)
    if chosen == "piecewise":
        assert "uniform batch" in runner.mode_reason


def test_full_refuses_a_decode_only_op_in_uniform_batches():
    runner = _runner(_step_over_decode_only, 2, "full")
    with pytest.raises(hal.UnsupportedModeError, match="uniform batch"):
        runner.capture()


def test_a_verify_runner_is_a_uniform_batch_runner():
    slots = decode_input_slots(CONFIG, query_tokens=3)
    step = LlamaDecoder(CONFIG).decode_forward(PagedKVCache(CONFIG, num_blocks=8, device="cpu", dtype=torch.float32))
    assert DecodeRunner(step, slots, "cpu", DecodeConfig(query_tokens=3)).batch_kind is hal.BatchKind.UNIFORM_BATCH
    plain = DecodeRunner(step, decode_input_slots(CONFIG), "cpu", DecodeConfig())
    assert plain.batch_kind is hal.BatchKind.UNIFORM_DECODE


def test_graph_support_levels_allow_what_they_say():
    decode, uniform, mixed = hal.BatchKind.UNIFORM_DECODE, hal.BatchKind.UNIFORM_BATCH, hal.BatchKind.MIXED
    support = hal.GraphSupport
    assert [support.UNIFORM_DECODE.allows(kind) for kind in (decode, uniform, mixed)] == [True, False, False]
    assert [support.UNIFORM_BATCH.allows(kind) for kind in (decode, uniform, mixed)] == [True, True, False]
    assert [support.ANY_BATCH.allows(kind) for kind in (decode, uniform, mixed)] == [True, True, True]
    assert not any(support.NEVER.allows(kind) for kind in (decode, uniform, mixed))
    assert list(support) == [support.ANY_BATCH, support.UNIFORM_BATCH, support.UNIFORM_DECODE, support.NEVER]


# --- slots that do not carry q tokens ------------------------------------------------------------------------


def _step():  # type: ignore[no-untyped-def]
    return LlamaDecoder(CONFIG).decode_forward(PagedKVCache(CONFIG, num_blocks=8, device="cpu", dtype=torch.float32))


def test_per_token_slots_of_another_q_are_refused_naming_the_slot():
    with pytest.raises(ValueError, match="'input_ids' is per-token with row_shape \\(2,\\).*query_tokens is 3"):
        DecodeRunner(_step(), decode_input_slots(CONFIG, query_tokens=2), "cpu", DecodeConfig(query_tokens=3))
    with pytest.raises(ValueError, match="'input_ids'.*DecodeConfig\\(query_tokens=4\\)"):
        DecodeRunner(_step(), decode_input_slots(CONFIG, query_tokens=4), "cpu", DecodeConfig())


def test_unmarked_slots_are_refused_at_q_above_one():
    unmarked = [replace(slot, per_token=False) for slot in decode_input_slots(CONFIG, query_tokens=3)]
    with pytest.raises(ValueError, match="per_token=True"):
        DecodeRunner(_step(), unmarked, "cpu", DecodeConfig(query_tokens=3))
    ids_marked = [replace(slot, per_token=slot.name == "input_ids") for slot in decode_input_slots(CONFIG, query_tokens=3)]
    with pytest.raises(ValueError, match="'slot_mapping' \\(role cache_locations\\).*per_token=True"):
        DecodeRunner(_step(), ids_marked, "cpu", DecodeConfig(query_tokens=3))


def test_a_batch_of_another_q_is_refused_naming_the_slot():
    cache = PagedKVCache(CONFIG, num_blocks=64, device="cpu", dtype=torch.float32)
    step = LlamaDecoder(CONFIG).decode_forward(cache)
    runner = DecodeRunner(step, decode_input_slots(CONFIG, query_tokens=3), "cpu", DecodeConfig(query_tokens=3, mode="disabled"))
    batch = DecodeWorkload(cache, 2, max_context_len=20, query_tokens=2).batch()
    with pytest.raises(ValueError, match="input slot 'input_ids': shape \\(2, 2\\), expected \\(rows, 3\\).*per-token"):
        runner.run(batch)


@pytest.mark.parametrize("query_tokens", [0, -1])
def test_query_tokens_must_be_positive(query_tokens):
    with pytest.raises(ValueError, match="query_tokens must be at least 1"):
        DecodeConfig(query_tokens=query_tokens)
    with pytest.raises(ValueError, match="query_tokens must be a positive integer"):
        decode_input_slots(CONFIG, query_tokens=query_tokens)


def test_query_tokens_comes_from_a_graph_config_and_is_type_checked():
    from runners import GraphConfig

    assert GraphConfig.from_dict({"decode": {"query_tokens": 3}}).decode.query_tokens == 3
    with pytest.raises(ValueError, match="decode: query_tokens must be an integer, got '3'"):
        GraphConfig.from_dict({"decode": {"query_tokens": "3"}})


def test_the_capture_summary_of_a_verify_runner_says_its_tokens_per_request():
    verifier = Verifier("cpu", 3, "full")
    with torch.inference_mode():
        summary = verifier.runner.capture().summary()
    assert summary.startswith("graphhal: captured 3 decode graphs at 1+2 tokens per request (full, cpu) for sizes 4..1 in ")
