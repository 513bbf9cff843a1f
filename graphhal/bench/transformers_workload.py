"""A transformers causal LM (Llama, Qwen2 or Mistral with random weights) as the bench's ``Workload``.

``graphhal bench --model llama`` times the same contenders as for the reference model (eager, the
hand-written floor, every runner mode, reduce-overhead) on a transformers model driven through
``graphhal.transformers`` (graphhal attention over the paged KV cache), and adds transformers' own decode
step as baselines (``graphhal.bench.contenders.transformers_baselines``), on ``baseline_model``: the same weights
(shared, not copied) under transformers' default attention, with its own caches.

The families and their shapes: ``graphhal.bench.transformers_families``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import hal
from graphhal.bench.plan import PrefillShape
from graphhal.bench.transformers_families import FAMILY_SHAPES, MAX_SEQ_LEN, family_config
from graphhal.bench.workload import PagedWorkload, cache_with_decode_requests
from graphhal.transformers import cache_shape, use_graphhal_attention
from graphhal.transformers.steps import DecodeStep, PrefillStep

@dataclass
class TransformersWorkload(PagedWorkload):
    """A transformers model on graphhal attention, its paged KV cache and decode requests: a ``Workload``."""

    baseline_model: torch.nn.Module = field(kw_only=True)  # the same weights under transformers' own attention
    family: str = field(kw_only=True)

    def __post_init__(self) -> None:
        self.decode_step = DecodeStep(self.model, self.kv_cache)
        self.decode_slots = self.decode.input_slots()

    def prefill_forward(self) -> PrefillStep:
        return PrefillStep(self.model, self.kv_cache)

    def describe(self) -> str:
        c = self.model.config
        parameters = sum(p.numel() for p in self.model.parameters()) / 1e9
        return (
            f"transformers {type(self.model).__name__} ({parameters:.2f}B parameters, random weights): {c.num_hidden_layers} "
            f"layers, hidden {c.hidden_size}, vocab {c.vocab_size}, {str(self.kv_cache.dtype).removeprefix('torch.')}, "
            f"decode contexts up to {self.context_len}"
        )


def build_transformers_workload(
    device: hal.Device,
    family: str,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    context_len: int,
    prefill_shapes: list[PrefillShape] = (),  # type: ignore[assignment]
    seed: int = 0,
    num_layers: int | None = None,
) -> TransformersWorkload:
    """``family``'s bench model with random weights on ``device``, a paged KV cache with room for every
    request, and ``max_batch_size`` decode requests with contexts of up to ``context_len``."""
    import transformers

    config = family_config(family, tiny=device.type == "cpu", num_layers=num_layers)
    torch.manual_seed(seed)
    with torch.device(device.torch_device):
        model = getattr(transformers, FAMILY_SHAPES[family]["model"])._from_config(config, dtype=dtype).eval()
    shape = cache_shape(model.config, max_seq_len=MAX_SEQ_LEN)
    baseline = _sharing_weights(model)
    use_graphhal_attention(model, shape.max_seq_len)
    kv_cache, decode = cache_with_decode_requests(
        shape, device, dtype, max_batch_size=max_batch_size, context_len=context_len, prefill_shapes=prefill_shapes, seed=seed
    )
    return TransformersWorkload(device, model, kv_cache, decode, context_len, baseline_model=baseline, family=family)


def _sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A second instance of ``model`` over the same parameter and buffer tensors, with a config of its own
    (so its attention implementation stays transformers' default when ``model`` switches to graphhal's)."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        twin = type(model)._from_config(config, dtype=next(model.parameters()).dtype)
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owner, _, attribute = name.rpartition(".")
        module = twin.get_submodule(owner)
        if isinstance(tensor, torch.nn.Parameter):
            setattr(module, attribute, tensor)
        else:
            module._buffers[attribute] = tensor
    return twin.eval()
