"""The reference decoder's prefill step: packed tokens of several requests through one forward.

What a prefill runner and a graph strategy rely on, pinned here: the attention op equals a token-by-token
reference and writes into ``out``; padded tokens and padded requests (filled with the slots' fill values)
neither change live tokens nor touch any request's blocks; a request's logits depend only on that request; a
prefill followed by decode steps, or split into chunks, equals one longer prefill; the step traces once under
torch.compile for every token count; in a breakable capture the attention is the break, and a full capture
refuses it.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import hal
from hal.graph_support import graph_support_of
from graphhal.paged_attention import (
    NULL_BLOCK,
    NULL_SLOT,
    OutOfBlocksError,
    PagedKVCache,
    decode_input_slots,
    prefill_attention,
    prefill_attention_reference,
    prefill_request_slots,
    prefill_token_slots,
)
from graphhal.refmodel import LlamaDecoder, ModelConfig, PrefillStep, PrefillWorkload
from graphhal.paged_attention.prefill_attention_op import prefill_attention_break
from support.kv_cache_changes import cache_snapshot, changed_slots

TINY = ModelConfig.tiny()
QUERY_LENS = (5, 1, 7)
CONTEXT_LENS = (2, 9, 0)


def build(*, query_lens=QUERY_LENS, context_lens=CONTEXT_LENS, token_ids=None, device: str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = 0, num_blocks: int = 64):
    """A model, a cache holding the workload's requests, and the bound prefill step."""
    model = LlamaDecoder(TINY, device, dtype, seed=seed)
    cache = PagedKVCache(TINY, num_blocks, device, dtype)
    workload = PrefillWorkload(cache, list(query_lens), context_lens=list(context_lens), token_ids=token_ids, seed=seed)
    return model, cache, workload, model.prefill_forward(cache)


def pad(batch: dict[str, torch.Tensor], *, tokens: int, requests: int) -> dict[str, torch.Tensor]:
    """What a prefill runner does: token slots padded to ``tokens`` rows, request slots to ``requests`` rows."""
    width = batch["block_tables"].shape[1]
    padded = {}
    for slots, rows in ((prefill_token_slots(), tokens), (prefill_request_slots(TINY, width), requests)):
        for slot in slots:
            live = batch[slot.name]
            tail = torch.full((rows - live.shape[0], *slot.row_shape), slot.fill, dtype=slot.dtype, device=live.device)
            padded[slot.name] = torch.cat([live, tail])
    return padded


def token_rows(batch: dict[str, torch.Tensor], rows: list[int], **request_slots: list[int]) -> dict[str, torch.Tensor]:
    """The batch with only the given token rows and new values for some request slots (same device)."""
    index = torch.tensor(rows, device=batch["input_ids"].device)
    picked = {name: batch[name].index_select(0, index) for name in ("input_ids", "positions", "slot_mapping")}
    picked["block_tables"] = batch["block_tables"]
    for name, values in request_slots.items():
        picked[name] = torch.tensor(values, dtype=torch.int32, device=index.device)
    return picked


def close(dtype: torch.dtype, device: str = "cpu") -> dict[str, float]:
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)


# --- the attention op -------------------------------------------------------------------------------------


def random_packed_batch(seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """Four live requests with random context and query lengths, a padding request between them and one at
    the end, and three padded tokens. Cache slots no request attends to hold NaN, so reading one shows."""
    generator = torch.Generator().manual_seed(seed)
    block_size, max_blocks = TINY.block_size, TINY.max_blocks_per_seq
    query_lens = torch.randint(1, 10, (4,), generator=generator).tolist()
    context_lens = torch.randint(0, 21, (4,), generator=generator).tolist()
    query_lens = query_lens[:2] + [0] + query_lens[2:] + [0]
    context_lens = context_lens[:2] + [5] + context_lens[2:] + [0]  # a padding request's seq_len is ignored
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]

    blocks_needed = [-(-n // block_size) if q else 0 for n, q in zip(seq_lens, query_lens)]
    num_blocks = 1 + sum(blocks_needed)
    shuffled = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()  # never the null block
    block_tables = torch.full((len(query_lens), max_blocks), NULL_BLOCK, dtype=torch.int32)
    key_cache = torch.full((num_blocks, block_size, TINY.num_kv_heads, TINY.head_dim), float("nan"))
    value_cache = key_cache.clone()
    for row, (needed, seq_len) in enumerate(zip(blocks_needed, seq_lens)):
        blocks, shuffled = shuffled[:needed], shuffled[needed:]
        block_tables[row, :needed] = torch.tensor(blocks, dtype=torch.int32)
        for position in range(seq_len if needed else 0):
            block, offset = blocks[position // block_size], position % block_size
            key_cache[block, offset] = torch.randn(TINY.num_kv_heads, TINY.head_dim, generator=generator)
            value_cache[block, offset] = torch.randn(TINY.num_kv_heads, TINY.head_dim, generator=generator)

    num_tokens = sum(query_lens) + 3
    q = torch.randn(num_tokens, TINY.num_heads, TINY.head_dim, generator=generator)
    return dict(
        q=q.to(device, dtype), key_cache=key_cache.to(device, dtype), value_cache=value_cache.to(device, dtype),
        block_tables=block_tables.to(device), query_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), scale=TINY.head_dim**-0.5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_op_equals_the_token_by_token_reference(graph_device, dtype, seed):
    inputs = random_packed_batch(seed, dtype, graph_device)
    out = torch.full_like(inputs["q"], float("nan"))
    address = out.data_ptr()
    assert prefill_attention(**inputs, out=out) is None
    assert out.data_ptr() == address, "the op must write into the caller's out, not rebind it"
    torch.testing.assert_close(out, prefill_attention_reference(**inputs), **close(dtype, graph_device))
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:])), "padded tokens' rows must come out as zeros"


@pytest.mark.cpu
def test_reference_is_causal_from_the_cached_context_on():
    """One request with a context of 4 and 3 new tokens: each new token sees the context and itself, no later."""
    key_cache = torch.randn(1, 8, 1, 4)  # one block of 8 tokens, one KV head
    value_cache = torch.arange(8.0).reshape(1, 8, 1, 1).expand(1, 8, 1, 4).contiguous()  # token t's value is t
    q = torch.zeros(3, 1, 4)  # zero queries attend uniformly to whatever they see
    one = dict(block_tables=torch.tensor([[0]], dtype=torch.int32), query_lens=torch.tensor([3], dtype=torch.int32),
               seq_lens=torch.tensor([7], dtype=torch.int32), scale=1.0)
    out = prefill_attention_reference(q, key_cache, value_cache, **one)
    assert out[:, 0, 0].tolist() == [2.0, 2.5, 3.0]  # means of 0..4, 0..5, 0..6
    op_out = torch.empty_like(q)
    prefill_attention(q, key_cache, value_cache, **one, out=op_out)
    torch.testing.assert_close(op_out, out)


@pytest.mark.cpu
def test_attention_op_passes_opcheck():
    """Schema and fake (meta) implementations are what torch.compile needs to trace the step."""
    inputs = random_packed_batch(0)
    args = tuple(inputs.values()) + (torch.empty_like(inputs["q"]),)
    torch.library.opcheck(torch.ops.graphhal.prefill_attention.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cpu
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(query_lens=[3, 2], seq_lens=[3, 2]), "query_lens add up to 5 tokens but the batch has only 4 rows"),
        (dict(seq_lens=[1, 1]), "request 0: seq_len 1 is less than query_len 2"),
        (dict(seq_lens=[9, 1]), "request 0: seq_len 9 does not fit its block table"),
        (dict(query_lens=[-1, 1]), "request 0: negative length"),
        (dict(query_lens=[2]), "one row per request"),
    ],
)
def test_reference_rejects_an_inconsistent_batch(change, message):
    # Only the reference reads the lengths on the host to check them; the graph-capturable kernels cannot, so
    # the runner checks a batch's query lengths on the host before every replay (hal.SlotRole.QUERY_LENS).
    inputs = small_valid_batch()
    del inputs["out"]
    prefill_attention_reference(**inputs)  # as built, the batch is fine: only the change breaks it
    inputs.update({name: torch.tensor(v, dtype=torch.int32) for name, v in change.items()})
    with pytest.raises(ValueError, match=message):
        prefill_attention_reference(**inputs)


@pytest.mark.cpu
def test_attention_op_rejects_an_out_of_another_shape():
    inputs = small_valid_batch()
    inputs["out"] = torch.empty(4, TINY.num_heads, 1)
    with pytest.raises(ValueError, match="out must have q's shape"):
        prefill_attention(**inputs)


def small_valid_batch() -> dict:
    """4 token rows; 2 requests with 2-block tables (8 tokens): 2 new tokens after 1 cached, and 1 new token."""
    kv_shape = (3, TINY.block_size, TINY.num_kv_heads, TINY.head_dim)
    return dict(
        q=torch.randn(4, TINY.num_heads, TINY.head_dim), key_cache=torch.randn(kv_shape), value_cache=torch.randn(kv_shape),
        block_tables=torch.tensor([[1, 2], [0, 0]], dtype=torch.int32),
        query_lens=torch.tensor([2, 1], dtype=torch.int32), seq_lens=torch.tensor([3, 1], dtype=torch.int32),
        scale=1.0, out=torch.empty(4, TINY.num_heads, TINY.head_dim),
    )


@pytest.mark.cpu
def test_attention_is_an_optional_break_point_that_declares_where_it_can_be_captured():
    assert not prefill_attention_break.required and prefill_attention_break.name == "graphhal.prefill_attention"
    op = torch.ops.graphhal.prefill_attention.default
    # The CPU and CUDA kernels read every length on the device; any other device but npu runs the host-reading
    # reference.
    assert graph_support_of(op, "cpu") == graph_support_of(op, "cuda") == hal.GraphSupport.ANY_BATCH
    assert graph_support_of(op, "npu") == hal.GraphSupport.ANY_BATCH  # host lengths updated before replays
    assert graph_support_of(op, "xpu") == hal.GraphSupport.NEVER


# --- the model's prefill step -----------------------------------------------------------------------------


@pytest.mark.cpu
def test_prefill_step_takes_exactly_the_token_then_request_slots_as_keywords():
    parameters = inspect.signature(PrefillStep.forward).parameters
    keyword_only = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == [slot.name for slot in prefill_token_slots() + prefill_request_slots(TINY)]


@pytest.mark.cpu
def test_prefill_returns_finite_logits_for_every_token():
    _, _, workload, step = build()
    logits = step(**workload.batch())
    assert logits.shape == (sum(QUERY_LENS), TINY.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_padded_tokens_and_requests_leave_live_tokens_unchanged_and_write_only_the_null_block(graph_device):
    _, cache, workload, step = build(device=graph_device)
    live = workload.batch()
    expected = step(**live)
    before = cache_snapshot(cache)
    padded = step(**pad(live, tokens=workload.num_tokens + 5, requests=workload.num_requests + 2))

    torch.testing.assert_close(padded[: workload.num_tokens], expected, **close(torch.float32, graph_device))
    assert torch.isfinite(padded).all()
    null_block_slots = set(range(NULL_BLOCK * TINY.block_size, (NULL_BLOCK + 1) * TINY.block_size))
    assert changed_slots(cache, before) <= null_block_slots | set(live["slot_mapping"].tolist())


@pytest.mark.cpu
def test_an_all_padding_batch_touches_no_request_block():
    _, cache, workload, step = build()
    before = cache_snapshot(cache)
    logits = step(**pad({name: t[:0] for name, t in workload.batch().items()}, tokens=6, requests=3))
    assert torch.isfinite(logits).all()
    assert changed_slots(cache, before) <= {NULL_SLOT}


@pytest.mark.cpu
def test_a_requests_logits_do_not_depend_on_the_other_requests():
    _, _, workload, step = build()
    together = step(**workload.batch())
    first = 0
    for request, query_len in enumerate(QUERY_LENS):
        alone = step(**workload.batch([request]))
        torch.testing.assert_close(alone, together[first : first + query_len], rtol=1e-5, atol=1e-5)
        first += query_len


@pytest.mark.cpu
def test_request_order_in_the_pack_does_not_matter():
    _, _, workload, step = build()
    forward = step(**workload.batch())
    backward = step(**workload.batch([2, 1, 0]))  # rows: request 2's 7 tokens, request 1's 1, request 0's 5
    reordered = torch.cat([backward[8:13], backward[7:8], backward[0:7]])
    torch.testing.assert_close(reordered, forward, rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_equals_one_longer_prefill(graph_device):
    """A server's lifecycle: prefill each prompt, then decode its next tokens one at a time."""
    steps = 4  # request 0 decodes positions 7 .. 10, crossing into a new block at 8
    _, _, longer, long_step = build(query_lens=[q + steps for q in QUERY_LENS], device=graph_device)
    long_logits = long_step(**longer.batch())

    prompts = [ids[:-steps] for ids in longer.token_ids]
    model, _, workload, step = build(token_ids=prompts, device=graph_device)
    decode_step = model.decode_forward(workload.kv_cache)
    step(**workload.batch())
    starts = [sum(q + steps for q in QUERY_LENS[:i]) for i in range(len(QUERY_LENS))]
    for s in range(steps):
        batch = workload.decode_batch([ids[len(ids) - steps + s] for ids in longer.token_ids])
        rows = [start + q + s for start, q in zip(starts, QUERY_LENS)]
        torch.testing.assert_close(decode_step(**batch), long_logits[rows], **close(torch.float32, graph_device))


@pytest.mark.cpu
def test_prefill_in_two_chunks_equals_one_prefill():
    """Chunked prefill: the second chunk attends to the first chunk's K/V through the cache."""
    _, _, workload, step = build()
    batch = workload.batch()
    whole = step(**batch)
    first_chunk = [2, 1, 3]  # new tokens per request in the first chunk
    starts = [0, 5, 6]
    rows1 = [start + j for start, n in zip(starts, first_chunk) for j in range(n)]
    rows2 = [start + j for start, n, q in zip(starts, first_chunk, QUERY_LENS) for j in range(n, q)]
    chunk1 = token_rows(batch, rows1, query_lens=first_chunk,
                        seq_lens=[c + n for c, n in zip(CONTEXT_LENS, first_chunk)])
    chunk2 = token_rows(batch, rows2, query_lens=[q - n for q, n in zip(QUERY_LENS, first_chunk)],
                        seq_lens=[c + q for c, q in zip(CONTEXT_LENS, QUERY_LENS)])
    for cache_tensor in workload.kv_cache.key_caches + workload.kv_cache.value_caches:
        cache_tensor.view(-1, TINY.num_kv_heads, TINY.head_dim)[batch["slot_mapping"]] = float("nan")  # forget them
    logits = torch.empty_like(whole)
    logits[rows1] = step(**chunk1)
    logits[rows2] = step(**chunk2)
    torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
def test_bfloat16_prefill_stays_close_to_float32():
    _, _, workload32, step32 = build()
    _, _, workload16, step16 = build(dtype=torch.bfloat16)
    logits16 = step16(**workload16.batch())
    assert logits16.dtype == torch.bfloat16 and torch.isfinite(logits16).all()
    similarity = torch.cosine_similarity(logits16.float(), step32(**workload32.batch()), dim=-1)
    assert (similarity > 0.98).all(), similarity


@pytest.mark.cpu
def test_prefill_step_compiles_once_for_every_token_count():
    """Dynamic in the token count: a prefill runner's token buckets share one trace."""
    _, _, workload, step = build()
    compiles = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(step, backend=counting_backend, dynamic=True, fullgraph=True)
    for tokens in (workload.num_tokens + 2, workload.num_tokens + 9):
        batch = pad(workload.batch(), tokens=tokens, requests=4)
        for slot in prefill_token_slots():
            torch._dynamo.mark_dynamic(batch[slot.name], 0)
        expected = step(**batch)
        torch.testing.assert_close(compiled(**batch), expected, rtol=1e-5, atol=1e-5)
    assert len(compiles) == 1
    called = {node.target for node in compiles[0].graph.nodes if node.op == "call_function"}
    assert torch.ops.graphhal.prefill_attention.default in called, "the op must stay one opaque call to split at"


def test_breakable_capture_breaks_at_each_layers_attention_and_follows_new_inputs(graph_device):
    device = hal.get_device(graph_device)
    _, _, workload, step = build(device=graph_device)
    shape = dict(tokens=workload.num_tokens + 3, requests=4)
    static = pad(workload.batch(), **shape)
    with torch.no_grad():
        step(**static)  # warm up outside the capture
        device.synchronize()
        graph = device.make_graph("breakable")
        with device.capture_session(graph, device.graph_pool()):
            logits = step(**static)
    assert graph.num_breaks == TINY.num_layers

    other = pad(workload.batch([2, 0]), **shape)  # other requests, same token and request counts
    for name, tensor in other.items():
        static[name].copy_(tensor)
    device.replay(graph)
    device.synchronize()
    with torch.no_grad():
        expected = step(**other)
    torch.testing.assert_close(logits, expected, **close(torch.float32, graph_device))


def test_the_eager_prefill_step_captures_in_one_full_graph_that_follows_any_request_split(graph_device):
    # The proof that nothing in the prefill step reads a length on the host: a CUDA capture would fail on the
    # sync, and the cpu device refuses host reads while it records. The graph then serves a batch of the same
    # token and request counts split differently, with other contexts.
    device = hal.get_device(graph_device)
    _, kv_cache, workload, step = build(device=graph_device)
    shape = dict(tokens=workload.num_tokens + 3, requests=4)
    # A graph's inputs are device buffers (the workload keeps query_lens on the host, as a scheduler does).
    static = {name: tensor.to(device.torch_device) for name, tensor in pad(workload.batch(), **shape).items()}
    with torch.no_grad():
        step(**static)
        device.synchronize()
        graph = device.make_graph("full")
        with device.capture_session(graph, device.graph_pool()):
            logits = step(**static)

    split_otherwise = PrefillWorkload(kv_cache, [1, workload.num_tokens - 4, 3], context_lens=[9, 0, 5], seed=7)
    try:
        other = pad(split_otherwise.batch(), **shape)
        for name, tensor in other.items():
            static[name].copy_(tensor)
        device.replay(graph)
        device.synchronize()
        with torch.no_grad():
            expected = step(**other)
        live = workload.num_tokens
        torch.testing.assert_close(logits[:live], expected[:live], **close(torch.float32, graph_device))
    finally:
        split_otherwise.release()


# --- inputs and the synthetic workload --------------------------------------------------------------------


@pytest.mark.cpu
def test_slots_match_the_batches_a_workload_builds():
    _, _, workload, _ = build()
    for slots, batch in ((workload.token_slots(), workload.token_batch()), (workload.request_slots(), workload.request_batch())):
        assert [slot.name for slot in slots] == list(batch)
        for slot in slots:
            assert batch[slot.name].dtype == slot.dtype and batch[slot.name].shape[1:] == slot.row_shape
    assert list(workload.batch()) == list(workload.token_batch()) + list(workload.request_batch())
    slots = {slot.name: slot for slot in workload.token_slots() + workload.request_slots()}
    assert {name: slot.fill for name, slot in slots.items()} == {
        "input_ids": 0, "positions": 0, "slot_mapping": NULL_SLOT, "query_lens": 0, "seq_lens": 0, "block_tables": NULL_BLOCK,
    }
    roles = {name: slot.role for name, slot in slots.items() if slot.role}
    assert roles == {
        "slot_mapping": hal.SlotRole.CACHE_LOCATIONS, "seq_lens": hal.SlotRole.SEQ_LENS, "query_lens": hal.SlotRole.QUERY_LENS
    }
    assert workload.request_batch()["query_lens"].device.type == "cpu"  # host counts, as a scheduler has them
    assert prefill_request_slots(TINY, 5)[2].row_shape == (5,)
    with pytest.raises(ValueError, match="max_blocks_per_seq must be positive"):
        prefill_request_slots(TINY, 0)


@pytest.mark.cpu
def test_workload_packs_each_requests_new_tokens_after_its_context():
    _, cache, workload, _ = build()
    batch = workload.batch()
    assert workload.num_tokens == sum(QUERY_LENS) == batch["input_ids"].shape[0]
    assert batch["query_lens"].tolist() == list(QUERY_LENS)
    assert batch["seq_lens"].tolist() == [c + q for c, q in zip(CONTEXT_LENS, QUERY_LENS)]
    assert batch["positions"].tolist() == [2, 3, 4, 5, 6] + [9] + [0, 1, 2, 3, 4, 5, 6]
    assert batch["input_ids"].tolist() == [t for ids in workload.token_ids for t in ids]
    first = 0
    for request, (context_len, query_len) in enumerate(zip(CONTEXT_LENS, QUERY_LENS)):
        table = batch["block_tables"][request]
        used = -(-(context_len + query_len) // TINY.block_size)
        assert (table[:used] != NULL_BLOCK).all() and (table[used:] == NULL_BLOCK).all()
        for j in range(query_len):
            block, offset = divmod(int(batch["slot_mapping"][first + j]), TINY.block_size)
            position = context_len + j
            assert block == table[position // TINY.block_size] and offset == position % TINY.block_size
        if context_len:  # the context is filled in, so attention over it is not attention over zeros
            assert cache.key_caches[0][table[0], 0].abs().sum() > 0
        first += query_len


@pytest.mark.cpu
def test_same_seed_same_workload_and_given_token_ids_are_used():
    _, _, a, _ = build(seed=5)
    _, _, b, _ = build(seed=5)
    assert a.token_ids == b.token_ids and all(torch.equal(x, y) for x, y in zip(a.kv_cache.key_caches, b.kv_cache.key_caches))
    _, _, c, _ = build(token_ids=[[1] * 5, [2], [3] * 7])
    assert c.batch()["input_ids"].tolist() == [1] * 5 + [2] + [3] * 7


@pytest.mark.cpu
def test_decode_batches_continue_each_request_and_allocate_a_block_at_a_boundary():
    cache = PagedKVCache(TINY, 16, "cpu", torch.float32)
    workload = PrefillWorkload(cache, [3, 4], context_lens=[0, 4])  # 3 and 8 tokens cached after the prefill
    free_before = cache.allocator.num_free
    first = workload.decode_batch([7, 9])
    assert list(first) == [slot.name for slot in decode_input_slots(TINY)] == [s.name for s in workload.decode_slots()]
    assert first["positions"].tolist() == [3, 8] and first["seq_lens"].tolist() == [4, 9]
    assert cache.allocator.num_free == free_before - 1, "position 8 starts request 1's third block"
    second = workload.decode_batch(torch.tensor([8, 10]))
    assert second["positions"].tolist() == [4, 9] and second["input_ids"].tolist() == [8, 10]
    assert cache.allocator.num_free == free_before - 2, "position 4 starts request 0's second block"
    assert (second["slot_mapping"] // TINY.block_size == second["block_tables"][[0, 1], [1, 2]]).all()
    with pytest.raises(ValueError, match="one next token per request"):
        workload.decode_batch([1])
    workload.release()
    assert cache.allocator.num_free == 15


@pytest.mark.cpu
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(query_lens=[]), "at least one request"),
        (dict(query_lens=[3, 0]), "at least one new token"),
        (dict(query_lens=[3, 2], context_lens=[1]), "context_lens has 1 entries but query_lens has 2"),
        (dict(query_lens=[3], context_lens=[-1]), "context_lens must be >= 0"),
        (dict(query_lens=[60], context_lens=[5]), "exceeds what a request can hold"),
        (dict(query_lens=[2], token_ids=[[1, 2, 3]]), "token_ids has lengths"),
        (dict(query_lens=[1], token_ids=[[TINY.vocab_size]]), "token ids must lie in"),
    ],
)
def test_workload_rejects_bad_requests_and_leaks_no_blocks(kwargs, message):
    cache = PagedKVCache(TINY, 8, "cpu", torch.float32)
    query_lens = kwargs.pop("query_lens")
    with pytest.raises(ValueError, match=message):
        PrefillWorkload(cache, query_lens, **kwargs)
    with pytest.raises(OutOfBlocksError):
        PrefillWorkload(cache, [12, 20])  # 3 blocks, then 5 of the 4 left
    assert cache.allocator.num_free == 7


# --- CUDA -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_prefill_matches_cpu_prefill_for_the_same_seeds():
    _, _, cpu_workload, cpu_step = build()
    _, _, cuda_workload, cuda_step = build(device="cuda")
    torch.testing.assert_close(cuda_step(**cuda_workload.batch()).cpu(), cpu_step(**cpu_workload.batch()),
                               rtol=1e-4, atol=1e-4)
