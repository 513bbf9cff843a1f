"""The reference decoder's eager step skips host work without changing a single bit of what it computes.

A runner executes the step's Python twice per captured bucket (warm-up, then capture), so the step keeps its
host overhead low:
- eagerly, where nothing traces or records the call, the custom ops' kernels run directly instead of through
  the ops' Python dispatch layers; under torch.compile and under dispatch modes (the CPU recorded graph,
  fake tensors) the step still calls the ops, so graphs are split and recorded at them as before;
- the rotary angles are gathered once per step, and each layer rotates its queries and keys as one block;
- the Triton launcher works out its constexprs once per shape.
Every one of these is pinned here as bit-identical to the plain way of doing it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import graphhal.paged_attention.decode_attention_op as attention_op
import graphhal.paged_attention.kv_cache as kv_cache_module
import graphhal.paged_attention.triton_decode_attention as triton_attention
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig, PrefillWorkload
from graphhal.refmodel.rotary import RotaryEmbedding

TINY = ModelConfig.tiny()
# Grouped queries (3 per KV head) and a head dim that is not a power of two, unlike the tiny model.
GQA = ModelConfig(**{**TINY.__dict__, "num_heads": 6, "num_kv_heads": 2, "head_dim": 12})


class PassThroughMode(TorchDispatchMode):
    """Runs every op unchanged; its presence alone makes the step call the custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def build_step(phase: str, config: ModelConfig, dtype: torch.dtype):
    """A fresh model, cache and batch (same seeds every time): the step and the cache it writes."""
    model = LlamaDecoder(config, "cpu", dtype, seed=3)
    cache = PagedKVCache(config, 64, "cpu", dtype)
    if phase == "decode":
        workload = DecodeWorkload(cache, 4, max_context_len=20, seed=4)
        return model.decode_forward(cache), workload.batch(), cache
    workload = PrefillWorkload(cache, [5, 1, 7], context_lens=[2, 9, 0], seed=4)
    return model.prefill_forward(cache), workload.batch(), cache


def run(step, batch, cache: PagedKVCache, *, through_ops: bool):
    with torch.no_grad():
        if through_ops:
            with PassThroughMode():
                logits = step(**batch)
        else:
            logits = step(**batch)
    return logits, cache.key_caches + cache.value_caches


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the step's calls into the two custom ops (the model calls them through these names)."""
    calls = {"write_kv_cache": 0, "decode_attention": 0}

    def counting(name: str, op):  # type: ignore[no-untyped-def]
        def call(*args):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return op(*args)

        return call

    monkeypatch.setattr(kv_cache_module, "_write_kv_cache_op", counting("write_kv_cache", kv_cache_module._write_kv_cache_op))
    monkeypatch.setattr(attention_op, "_decode_attention_op", counting("decode_attention", attention_op._decode_attention_op))
    return calls


@pytest.mark.cpu
def test_an_eager_step_runs_the_kernels_without_entering_the_ops(op_calls):
    step, batch, cache = build_step("decode", TINY, torch.float32)
    run(step, batch, cache, through_ops=False)
    assert op_calls == {"write_kv_cache": 0, "decode_attention": 0}


@pytest.mark.cpu
def test_a_step_under_a_dispatch_mode_calls_the_ops_so_the_mode_sees_them(op_calls):
    step, batch, cache = build_step("decode", TINY, torch.float32)
    run(step, batch, cache, through_ops=True)
    assert op_calls == {"write_kv_cache": TINY.num_layers, "decode_attention": TINY.num_layers}


@pytest.mark.cpu
def test_a_call_whose_inputs_require_grad_goes_through_the_op_where_autograd_sees_it(op_calls):
    step, batch, cache = build_step("decode", TINY, torch.float32)
    step.model.layers[0].qkv_proj.requires_grad_(True)  # the first layer's q, k and v now require grad
    step(**batch)
    assert op_calls == {"write_kv_cache": 1, "decode_attention": 1}  # the other layer's calls run directly


@pytest.mark.cpu
@pytest.mark.parametrize("config", [TINY, GQA], ids=["tiny", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_direct_kernels_give_the_ops_results(phase, dtype, config):
    direct_logits, direct_cache = run(*build_step(phase, config, dtype), through_ops=False)
    op_logits, op_cache = run(*build_step(phase, config, dtype), through_ops=True)
    if phase == "decode":  # the same kernel either way: bit for bit
        assert torch.equal(direct_logits, op_logits)
        assert all(torch.equal(a, b) for a, b in zip(direct_cache, op_cache))
        return
    # Prefill on CPU: the op's kernel is the masked one a graph can record; the direct eager call runs one SDPA
    # per request over host lengths (faster, not recordable). Same math, another summation order, which later
    # layers' keys and values inherit.
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(direct_logits, op_logits, **tolerance)
    for direct, op in zip(direct_cache, op_cache):
        torch.testing.assert_close(direct, op, **tolerance)


@pytest.mark.cpu
def test_a_compiled_step_still_calls_both_ops_as_single_nodes():
    step, batch, _ = build_step("decode", TINY, torch.float32)
    graphs = []

    def keep_graph(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(step, backend=keep_graph, fullgraph=True)(**batch)
    (graph,) = graphs
    called = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert called.count(torch.ops.graphhal.write_kv_cache.default) == TINY.num_layers
    assert called.count(torch.ops.graphhal.decode_attention.default) == TINY.num_layers


def rotate_half_split(x: torch.Tensor, rotary: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    """RoPE as first written: each half rotated on its own, then joined (what ``rotate`` must equal)."""
    cos = rotary.cos.index_select(0, positions)[:, None, :]
    sin = rotary.sin.index_select(0, positions)[:, None, :]
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotating_queries_and_keys_as_one_block_is_bit_identical_to_rotating_each_half_split(dtype):
    heads, kv_heads, head_dim, tokens = 6, 2, 16, 9
    rotary = RotaryEmbedding(head_dim, 2048, 10000.0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator) * 30).to(dtype)
    qkv[0, ::3] = 0.0  # signed zeros at position 0 (sin = 0) are where a - b and a + (-b) could differ
    qkv[1, ::5] = -0.0
    positions = torch.tensor([0, 0, 1, 2, 100, 1000, 2047, 1500, 7])
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)

    block = qkv[:, : (heads + kv_heads) * head_dim].reshape(tokens, heads + kv_heads, head_dim)
    rotated_q, rotated_k = rotary.rotate(block, *rotary.angles(positions)).split_with_sizes([heads, kv_heads], dim=1)

    for rotated, alone in ((rotated_q, q), (rotated_k, k)):
        expected = rotate_half_split(alone, rotary, positions)
        assert rotated.dtype == dtype
        assert torch.equal(rotated, expected) and torch.equal(rotated.signbit(), expected.signbit())  # -0.0 too
    assert torch.equal(rotary(q, positions), rotate_half_split(q, rotary, positions))


needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_attention.runs_in_interpreter(),
    reason="the kernel was compiled for a GPU; CPU tensors need TRITON_INTERPRET=1 set before it is imported",
)


@pytest.mark.cpu
@needs_interpreter
def test_triton_kernel_reads_queries_through_their_strides():
    """In the model q is a view into the rotated q/k block (rows strided by heads + kv_heads): the kernel
    must give exactly what it gives for a contiguous copy."""
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    generator = torch.Generator().manual_seed(1)
    block = torch.randn(3, heads + kv_heads, head_dim, generator=generator)
    q = block[:, :heads]
    key_cache = torch.randn(6, block_size, kv_heads, head_dim, generator=generator)
    value_cache = torch.randn(6, block_size, kv_heads, head_dim, generator=generator)
    args = dict(
        key_cache=key_cache, value_cache=value_cache,
        block_tables=torch.tensor([[1, 2], [3, 0], [4, 5]], dtype=torch.int32),
        seq_lens=torch.tensor([7, 0, 5], dtype=torch.int32), scale=head_dim**-0.5,
    )
    strided, contiguous = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    triton_attention.paged_decode_attention(q, out=strided, **args)
    triton_attention.paged_decode_attention(q.contiguous(), out=contiguous, **args)
    assert not q.is_contiguous() and torch.equal(strided, contiguous)


@pytest.mark.cpu
@needs_interpreter
def test_triton_launcher_checks_the_shape_on_every_call_not_only_the_first():
    q = torch.randn(1, 3, 16)
    cache = torch.randn(2, 4, 2, 16)
    args = dict(key_cache=cache, value_cache=cache, block_tables=torch.tensor([[1]], dtype=torch.int32),
                seq_lens=torch.tensor([3], dtype=torch.int32), scale=0.25, out=torch.empty_like(q))
    for _ in range(2):  # the launch constants are cached per shape; a bad shape is never cached
        with pytest.raises(ValueError, match="multiple of num_kv_heads"):
            triton_attention.paged_decode_attention(q, **args)
