"""The reference decoder behaves like a server's model must for graph capture.

What the runners rely on, pinned here: padded rows (filled with the slots' fill values) neither change live
rows nor touch any request's cache blocks; a row's logits depend only on its own inputs; the step is
deterministic and replayable; the attention op writes into ``out`` and traces under torch.compile; the
allocator never hands out the null block.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from graphhal.paged_attention import (

    NULL_BLOCK,

    NULL_SLOT,

    BlockAllocator,

    OutOfBlocksError,

    PagedKVCache,

    decode_attention,

    decode_attention_reference,

    decode_input_slots,

    write_kv_cache,

)

from graphhal.refmodel import DecodeStep, DecodeWorkload, LlamaDecoder, ModelConfig
from support.kv_cache_changes import cache_snapshot, changed_slots

TINY = ModelConfig.tiny()


def build(config: ModelConfig = TINY, *, num_requests: int = 5, max_context_len: int = 21, device: str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = 0, num_blocks: int = 64):
    """A model, a cache holding ``num_requests`` live requests, and the bound decode step."""
    model = LlamaDecoder(config, device, dtype, seed=seed)
    cache = PagedKVCache(config, num_blocks, device, dtype)
    workload = DecodeWorkload(cache, num_requests, max_context_len=max_context_len, seed=seed)
    return model, cache, workload, model.decode_forward(cache)


def pad_batch(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """What a runner does to a live batch: append padded rows holding each slot's fill value."""
    slots = decode_input_slots(TINY, batch["block_tables"].shape[1])
    padded = {}
    for slot in slots:
        live = batch[slot.name]
        tail = torch.full((rows - live.shape[0], *slot.row_shape), slot.fill, dtype=slot.dtype, device=live.device)
        padded[slot.name] = torch.cat([live, tail])
    return padded


# --- configuration ---------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_default_config_is_the_benchmark_model():
    config = ModelConfig()
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (8, 1024, 16, 8, 64)
    assert (config.intermediate_size, config.vocab_size, config.block_size, config.max_seq_len) == (2816, 8192, 16, 2048)
    assert config.max_blocks_per_seq == 128 and config.queries_per_kv_head == 2


@pytest.mark.cpu
@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(head_dim=15), "even"),
        (dict(max_seq_len=63), "multiple of block_size"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(rms_eps=0.0), "rms_eps"),
    ],
)
def test_invalid_config_is_rejected_with_the_reason(override, message):
    fields = {**TINY.__dict__, **override}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


# --- block allocation and the KV cache --------------------------------------------------------------------


@pytest.mark.cpu
def test_allocator_never_hands_out_the_null_block():
    allocator = BlockAllocator(6)
    taken = allocator.allocate(2) + allocator.allocate(3)
    assert sorted(taken) == [1, 2, 3, 4, 5] and NULL_BLOCK not in taken
    assert allocator.num_free == 0


@pytest.mark.cpu
def test_allocator_out_of_blocks_raises_clearly_and_takes_nothing():
    allocator = BlockAllocator(4)
    allocator.allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2 KV-cache blocks but only 1 of 3"):
        allocator.allocate(2)
    assert allocator.num_free == 1


@pytest.mark.cpu
def test_freed_blocks_are_reusable_and_double_free_is_an_error():
    allocator = BlockAllocator(3)
    blocks = allocator.allocate(2)
    allocator.free(blocks)
    assert sorted(allocator.allocate(2)) == sorted(blocks)
    allocator.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free([NULL_BLOCK])


@pytest.mark.cpu
def test_write_kv_cache_stores_each_row_at_its_slot():
    cache = PagedKVCache(TINY, 4, "cpu", torch.float32)
    key = torch.randn(3, TINY.num_kv_heads, TINY.head_dim)
    value = torch.randn(3, TINY.num_kv_heads, TINY.head_dim)
    slots = torch.tensor([cache.slot(2, 1), cache.slot(3, 3), NULL_SLOT])
    write_kv_cache(key, value, cache.key_caches[0], cache.value_caches[0], slots)
    assert torch.equal(cache.key_caches[0][2, 1], key[0]) and torch.equal(cache.value_caches[0][3, 3], value[1])
    assert torch.equal(cache.key_caches[0][NULL_BLOCK, 0], key[2])
    assert changed_slots(cache, [torch.zeros_like(t) for t in cache.key_caches + cache.value_caches]) == {9, 15, 0}


# --- the attention op -------------------------------------------------------------------------------------


def attention_inputs(seed: int = 0) -> dict:
    """A workload's real cache and tables, plus two padded rows, and a random query per row."""
    _, cache, workload, _ = build(num_requests=4, max_context_len=13, seed=seed)
    batch = pad_batch(workload.batch(), rows=6)
    q = torch.randn(6, TINY.num_heads, TINY.head_dim, generator=torch.Generator().manual_seed(seed))
    return dict(q=q, key_cache=cache.key_caches[1], value_cache=cache.value_caches[1],
                block_tables=batch["block_tables"], seq_lens=batch["seq_lens"], scale=TINY.head_dim**-0.5)


@pytest.mark.cpu
def test_attention_op_is_registered_and_writes_into_out():
    inputs = attention_inputs()
    out = torch.full_like(inputs["q"], float("nan"))
    address = out.data_ptr()
    assert torch.ops.graphhal.decode_attention.default is not None
    assert torch.ops.graphhal.decode_attention(**inputs, out=out) is None
    assert out.data_ptr() == address
    torch.testing.assert_close(out, decode_attention_reference(**inputs), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[4:], torch.zeros_like(out[4:])), "padded rows (seq_len 0) must come out as zeros"


@pytest.mark.cpu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_attention_kernel_equals_reference(seed):
    inputs = attention_inputs(seed)
    out = torch.empty_like(inputs["q"])
    decode_attention(**inputs, out=out)
    torch.testing.assert_close(out, decode_attention_reference(**inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
def test_custom_ops_pass_opcheck():
    """Schema and fake (meta) implementations are what torch.compile needs to trace the step."""
    checks = ("test_schema", "test_faketensor")
    inputs = attention_inputs()
    torch.library.opcheck(torch.ops.graphhal.decode_attention.default,
                          tuple(inputs.values()) + (torch.empty_like(inputs["q"]),), test_utils=checks)
    kv = torch.randn(3, TINY.num_kv_heads, TINY.head_dim)
    torch.library.opcheck(torch.ops.graphhal.write_kv_cache.default,
                          (kv, kv.clone(), inputs["key_cache"].clone(), inputs["value_cache"].clone(), torch.tensor([5, 9, 0])),
                          test_utils=checks)


# --- the model's decode step ------------------------------------------------------------------------------


@pytest.mark.cpu
def test_decode_step_returns_finite_logits_per_row():
    _, _, workload, step = build()
    logits = step(**workload.batch())
    assert logits.shape == (5, TINY.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.cpu
def test_decode_step_takes_exactly_the_input_slots_as_keywords():
    parameters = inspect.signature(DecodeStep.forward).parameters
    keyword_only = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == [slot.name for slot in decode_input_slots(TINY)]


@pytest.mark.cpu
def test_same_seed_same_logits_other_seed_other_logits():
    _, _, workload_a, step_a = build(seed=3)
    _, _, workload_b, step_b = build(seed=3)
    _, _, workload_c, step_c = build(seed=4)
    logits_a = step_a(**workload_a.batch())
    assert torch.equal(logits_a, step_b(**workload_b.batch()))
    assert not torch.allclose(logits_a, step_c(**workload_c.batch()))


@pytest.mark.cpu
def test_running_the_same_batch_again_gives_the_same_logits():
    """The step rewrites its own new slots with the same values, so a batch can be replayed for graphhal.bench."""
    _, _, workload, step = build()
    batch = workload.batch()
    assert torch.equal(step(**batch), step(**batch))


@pytest.mark.cpu
def test_a_rows_logits_do_not_depend_on_the_other_rows():
    _, _, workload, step = build(num_requests=3)
    batch = workload.batch()
    together = step(**batch)
    for row in range(3):
        alone = step(**{name: tensor[row : row + 1] for name, tensor in batch.items()})
        torch.testing.assert_close(alone[0], together[row], rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
def test_padded_rows_leave_live_rows_unchanged_and_write_only_the_null_block():
    _, cache, workload, step = build(num_requests=3)
    live = workload.batch()
    expected = step(**live)
    before = cache_snapshot(cache)
    padded = step(**pad_batch(live, rows=8))

    torch.testing.assert_close(padded[:3], expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded[3:]).all()
    null_block_slots = set(range(NULL_BLOCK * TINY.block_size, (NULL_BLOCK + 1) * TINY.block_size))
    assert changed_slots(cache, before) <= null_block_slots | set(live["slot_mapping"].tolist())


@pytest.mark.cpu
def test_an_all_padding_batch_touches_no_request_block():
    _, cache, workload, step = build(num_requests=4)
    before = cache_snapshot(cache)
    logits = step(**pad_batch({name: tensor[:0] for name, tensor in workload.batch().items()}, rows=4))
    assert torch.isfinite(logits).all()
    assert changed_slots(cache, before) <= {NULL_SLOT}


@pytest.mark.cpu
def test_bfloat16_activations_stay_finite_through_a_deep_stack():
    deep = ModelConfig(**{**TINY.__dict__, "num_layers": 12})
    _, _, workload32, step32 = build(deep, dtype=torch.float32)
    _, _, workload16, step16 = build(deep, dtype=torch.bfloat16)
    logits16 = step16(**workload16.batch())
    assert torch.isfinite(logits16).all()
    similarity = torch.cosine_similarity(logits16.float(), step32(**workload32.batch()), dim=-1)
    assert (similarity > 0.98).all(), similarity


@pytest.mark.cpu
def test_binding_a_cache_of_another_model_is_refused():
    model = LlamaDecoder(TINY)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        model.decode_forward(PagedKVCache(TINY, 8, "cpu", torch.bfloat16))
    with pytest.raises(ValueError, match="different ModelConfig"):
        model.decode_forward(PagedKVCache(ModelConfig(**{**TINY.__dict__, "num_layers": 3}), 8, "cpu", torch.float32))


@pytest.mark.cpu
def test_step_compiles_with_torch_compile_and_still_writes_the_cache():
    _, cache, workload, step = build(num_requests=3)
    batch = workload.batch()
    expected = step(**batch)
    after_eager = cache_snapshot(cache)
    for tensor in cache.key_caches + cache.value_caches:  # forget the new tokens: the compiled step must rewrite them
        tensor.view(-1, TINY.num_kv_heads, TINY.head_dim)[batch["slot_mapping"]] = 0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**batch), expected, rtol=1e-5, atol=1e-5)
    for now, then in zip(cache.key_caches + cache.value_caches, after_eager):
        torch.testing.assert_close(now, then, rtol=1e-5, atol=1e-5)


# --- inputs and the synthetic workload --------------------------------------------------------------------


@pytest.mark.cpu
def test_input_slots_match_the_batches_a_workload_builds():
    _, _, workload, _ = build()
    batch = workload.batch()
    slots = workload.input_slots()
    assert [slot.name for slot in slots] == list(batch)
    for slot in slots:
        assert batch[slot.name].dtype == slot.dtype and batch[slot.name].shape[1:] == slot.row_shape
    fills = {slot.name: slot.fill for slot in slots}
    assert fills == {"input_ids": 0, "positions": 0, "seq_lens": 0, "block_tables": NULL_BLOCK, "slot_mapping": NULL_SLOT}
    assert NULL_SLOT // TINY.block_size == NULL_BLOCK, "the padding slot must lie inside the null block"


@pytest.mark.cpu
def test_workload_rows_describe_their_next_token():
    _, cache, workload, _ = build(num_requests=6)
    batch = workload.batch()
    for row, context_len in enumerate(workload.context_lens):
        table = batch["block_tables"][row]
        used_blocks = -(-(context_len + 1) // TINY.block_size)
        assert (table[:used_blocks] != NULL_BLOCK).all() and (table[used_blocks:] == NULL_BLOCK).all()
        assert batch["positions"][row] == context_len and batch["seq_lens"][row] == context_len + 1
        block, offset = divmod(int(batch["slot_mapping"][row]), TINY.block_size)
        assert block == table[context_len // TINY.block_size] and offset == context_len % TINY.block_size
        # its context is filled in, so attention over it is not attention over zeros
        assert cache.key_caches[0][table[0], 0].abs().sum() > 0
    assert {name: t.shape[0] for name, t in workload.batch(2).items()} == dict.fromkeys(batch, 2)


@pytest.mark.cpu
def test_advance_moves_requests_on_and_allocates_a_block_at_a_boundary():
    cache = PagedKVCache(TINY, 16, "cpu", torch.float32)
    workload = DecodeWorkload(cache, 2, min_context_len=2, max_context_len=2)  # new token at offset 2 of block 1
    free_before = cache.allocator.num_free
    for step in range(2):
        workload.advance(torch.tensor([7 + step, 9 + step]))
    batch = workload.batch()
    assert batch["positions"].tolist() == [4, 4] and batch["input_ids"].tolist() == [8, 10]
    assert cache.allocator.num_free == free_before - 2, "position 4 starts each request's second block"
    assert (batch["slot_mapping"] // TINY.block_size == batch["block_tables"][:, 1]).all()
    workload.release()
    assert cache.allocator.num_free == 15


@pytest.mark.cpu
def test_workload_that_does_not_fit_the_cache_raises_and_leaks_no_blocks():
    cache = PagedKVCache(TINY, 8, "cpu", torch.float32)
    with pytest.raises(OutOfBlocksError):
        DecodeWorkload(cache, 10, max_context_len=20)
    assert cache.allocator.num_free == 7


# --- CUDA -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_step_matches_cpu_step_for_the_same_seeds():
    _, _, cpu_workload, cpu_step = build(num_requests=4)
    _, _, cuda_workload, cuda_step = build(num_requests=4, device="cuda")
    torch.testing.assert_close(cuda_step(**cuda_workload.batch()).cpu(), cpu_step(**cpu_workload.batch()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_replay_of_the_step_follows_new_inputs():
    """Captured once with one batch, replayed with another in the same buffers: nothing host-side is baked in."""
    _, cache, workload, step = build(num_requests=8, device="cuda", num_blocks=128)
    captured = pad_batch(workload.batch(3), rows=8)
    replayed = workload.batch(8)
    static = {name: tensor.clone() for name, tensor in captured.items()}
    with torch.no_grad():
        step(**static)  # warm up: compiles the Triton kernel outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(**static)
        for name, tensor in replayed.items():
            static[name].copy_(tensor)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(logits, step(**replayed), rtol=1e-5, atol=1e-5)
