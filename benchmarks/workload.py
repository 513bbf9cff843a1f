"""What every contender runs: the reference decoder, its paged KV cache and the decode requests.

Built once per bench run; every contender gets the same model, cache and batches, so their step times and
outputs are comparable. The cache has room for the decode requests plus the largest prefill case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import hal
from refmodel import DecodeStep, DecodeWorkload, LlamaDecoder, ModelConfig, PagedKVCache
from runners import InputSlot


@dataclass(frozen=True)
class PrefillShape:
    """One prefill case: ``tokens`` new tokens in total, split as evenly as possible over ``requests``."""

    tokens: int
    requests: int

    def query_lens(self) -> list[int]:
        base, extra = divmod(self.tokens, self.requests)
        return [base + (1 if i < extra else 0) for i in range(self.requests)]

    @property
    def label(self) -> str:
        return f"{self.tokens} tok x{self.requests}"


@dataclass
class BenchModel:
    device: hal.Device
    config: ModelConfig
    dtype: torch.dtype
    context_len: int
    model: LlamaDecoder
    kv_cache: PagedKVCache
    decode: DecodeWorkload
    decode_step: DecodeStep
    decode_slots: list[InputSlot] = field(default_factory=list)

    def describe(self) -> str:
        c = self.config
        return (
            f"reference decoder: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
            f"{str(self.dtype).removeprefix('torch.')}, decode contexts up to {self.context_len}"
        )


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def build_bench_model(
    device: hal.Device,
    config: ModelConfig,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    context_len: int,
    prefill_shapes: list[PrefillShape] = (),  # type: ignore[assignment]
    seed: int = 0,
) -> BenchModel:
    blocks_per_request = blocks_for(context_len + 1, config.block_size)
    # Prefill workloads are built and released one at a time, so the cache needs room for the largest.
    prefill_blocks = max(
        (sum(blocks_for(n, config.block_size) for n in shape.query_lens()) for shape in prefill_shapes), default=0
    )
    num_blocks = 1 + max_batch_size * blocks_per_request + prefill_blocks  # block 0: the null block
    kv_cache = PagedKVCache(config, num_blocks, device.torch_device, dtype)
    model = LlamaDecoder(config, device.torch_device, dtype, seed=seed)
    decode = DecodeWorkload(
        kv_cache, max_batch_size, max_context_len=context_len, max_blocks_per_seq=blocks_per_request, seed=seed
    )
    return BenchModel(
        device=device,
        config=config,
        dtype=dtype,
        context_len=context_len,
        model=model,
        kv_cache=kv_cache,
        decode=decode,
        decode_step=model.decode_forward(kv_cache),
        decode_slots=decode.input_slots(),
    )
