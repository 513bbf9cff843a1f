"""What every contender runs: a model's decode and prefill steps, the KV cache they share, and the requests.

Built once per bench run; every contender gets the same steps, cache and batches, so their step times and
outputs are comparable. ``Workload`` is what the contenders and the setup measurements use of it, and all
they may use: another model (a Hugging Face Llama, Qwen2 or Mistral, say) plugs in as another class with
these members. ``ReferenceWorkload`` is graphhal's reference decoder and its paged KV cache, which has room
for the decode requests plus the largest prefill case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

import hal
from graphhal.bench.plan import PrefillShape
from graphhal.paged_attention import PagedKVCache, prefill_request_slots, prefill_token_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig, PrefillStep, PrefillWorkload
from runners import InputSlot


@dataclass
class PrefillCase:
    """One prefill shape's requests in the KV cache: the forward to run them with and its batch.

    ``release`` frees their cache blocks; the cache holds one case at a time besides the decode requests.
    """

    shape: PrefillShape
    forward: Callable[..., Any]
    batch: dict[str, torch.Tensor]
    release: Callable[[], None]


class Workload(Protocol):
    """What contenders and setup measurements use of a model, its cache and its requests."""

    device: hal.Device
    decode_step: Callable[..., Any]  # one decode step: ``decode_step(**batch)``
    decode_slots: list[InputSlot]  # the inputs of ``decode_step``, for a ``DecodeRunner``
    group: Any  # the process group the model's collectives run over (tensor parallel), or None

    def watched(self) -> dict[str, Any]:
        """What a runner should watch for moved tensors (``watched_tensors``): the weights and the KV cache."""
        ...

    def decode_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The first ``batch_size`` decode requests as one batch; the same tensors every call."""
        ...

    def kv_cache_tensors(self) -> list[torch.Tensor]:
        """Tensors every step reads and writes in place: they stay at their addresses for the whole run."""
        ...

    def prefill_forward(self) -> Callable[..., Any]:
        """A fresh prefill step over the KV cache: ``prefill_forward()(**case.batch)``."""
        ...

    def prefill_slots(self) -> tuple[list[InputSlot], list[InputSlot]]:
        """The per-token and per-request inputs of the prefill step, for a ``PrefillRunner``."""
        ...

    def prefill_case(self, shape: PrefillShape, seed: int) -> PrefillCase:
        """Requests of ``shape`` placed in the KV cache; the caller releases them."""
        ...

    def describe(self) -> str:
        """One line for the header: the model, its dtype and the decode contexts."""
        ...


@dataclass
class PagedWorkload:
    """A model over a refmodel ``PagedKVCache`` with its decode requests: what every such ``Workload`` shares.

    A subclass gives the model's steps: ``decode_step`` and ``decode_slots`` (set in ``__post_init__``),
    ``prefill_forward`` and ``describe``.
    """

    device: hal.Device
    model: torch.nn.Module
    kv_cache: PagedKVCache
    decode: DecodeWorkload  # the decode requests, their contexts in the cache
    context_len: int  # the longest of those contexts
    group: Any = None
    decode_step: Callable[..., Any] = field(init=False)
    decode_slots: list[InputSlot] = field(init=False)

    def watched(self) -> dict[str, Any]:
        return {"model": self.model, "kv_cache": self.kv_cache}

    def decode_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self.decode.batch(batch_size)

    def kv_cache_tensors(self) -> list[torch.Tensor]:
        return [*self.kv_cache.key_caches, *self.kv_cache.value_caches]

    def prefill_forward(self) -> Callable[..., Any]:
        raise NotImplementedError

    def prefill_slots(self) -> tuple[list[InputSlot], list[InputSlot]]:
        conventions = self.device.conventions
        token_slots, request_slots = prefill_token_slots(), prefill_request_slots(self.kv_cache.config)
        return [s.for_device(conventions) for s in token_slots], [s.for_device(conventions) for s in request_slots]

    def prefill_case(self, shape: PrefillShape, seed: int) -> PrefillCase:
        # In the device's conventions (npu: int32 cache locations), as its runners take them.
        requests = PrefillWorkload(
            self.kv_cache, shape.query_lens(), context_lens=shape.context_lens(), seed=seed,
            conventions=self.device.conventions,
        )
        return PrefillCase(shape, self.prefill_forward(), requests.batch(), requests.release)


@dataclass
class ReferenceWorkload(PagedWorkload):
    """graphhal's reference decoder (refmodel), its paged KV cache and its decode requests: a ``Workload``."""

    model: LlamaDecoder

    def __post_init__(self) -> None:
        self.decode_step = self.model.decode_forward(self.kv_cache)
        self.decode_slots = self.decode.input_slots()

    def prefill_forward(self) -> PrefillStep:
        return self.model.prefill_forward(self.kv_cache)

    def describe(self) -> str:
        c = self.model.config
        tp = f", tensor parallel over {self.model.tp.size} ranks" if self.model.tp.size > 1 else ""
        return (
            f"reference decoder: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
            f"{str(self.kv_cache.dtype).removeprefix('torch.')}, decode contexts up to {self.context_len}{tp}"
        )


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def cache_with_decode_requests(
    cache_config: ModelConfig,
    device: hal.Device,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    context_len: int,
    prefill_shapes: Sequence[PrefillShape],
    seed: int,
) -> tuple[PagedKVCache, DecodeWorkload]:
    """A paged KV cache of ``cache_config``'s shape with room for ``max_batch_size`` decode requests (contexts
    of up to ``context_len`` and the new token) and for the largest of ``prefill_shapes`` (prefill cases are
    placed and released one at a time), and the decode requests placed in it."""
    blocks_per_request = blocks_for(context_len + 1, cache_config.block_size)
    prefill_blocks = max(
        (
            sum(blocks_for(c + n, cache_config.block_size) for c, n in zip(shape.context_lens(), shape.query_lens()))
            for shape in prefill_shapes
        ),
        default=0,
    )
    num_blocks = 1 + max_batch_size * blocks_per_request + prefill_blocks  # block 0: the null block
    kv_cache = PagedKVCache(cache_config, num_blocks, device.torch_device, dtype)
    decode = DecodeWorkload(
        kv_cache, max_batch_size, max_context_len=context_len, max_blocks_per_seq=blocks_per_request, seed=seed,
        conventions=device.conventions,  # the role inputs in the dtypes the device's kernels take (npu: int32)
    )
    return kv_cache, decode


def build_reference_workload(
    device: hal.Device,
    config: ModelConfig,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    context_len: int,
    prefill_shapes: list[PrefillShape] = (),  # type: ignore[assignment]
    seed: int = 0,
    tp_group: Any = None,
) -> ReferenceWorkload:
    """The reference model (this rank's shard of it under ``tp_group``), a KV cache with room for every request
    (this rank's KV heads), and ``max_batch_size`` decode requests with contexts of up to ``context_len``."""
    model = LlamaDecoder(config, device.torch_device, dtype, seed=seed, tp_group=tp_group)
    kv_cache, decode = cache_with_decode_requests(
        model.local_config, device, dtype, max_batch_size=max_batch_size, context_len=context_len,
        prefill_shapes=prefill_shapes, seed=seed,
    )
    return ReferenceWorkload(device, model, kv_cache, decode, context_len, tp_group)
