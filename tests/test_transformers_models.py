"""Hugging Face transformers models through the runners: graph output equals eager.

Llama and Qwen2, built from their config classes with random weights (no download), in float32. The step is
what a server without a KV cache in the graph would capture: a batch of rows, each a fixed window of the
request's last ``WINDOW`` tokens with their positions, returning the logits of every token. The runner's
bucketed dimension is dim 0, the rows.

On cuda every mode runs. On the cpu reference device piecewise runs; full and breakable are skipped:
transformers' mask code (``find_packed_sequence_indices`` in ``transformers/masking_utils.py``) reads
``(packed_sequence_mask[:, -1] == 0).all()`` on the host unless it sees a compile or a CUDA stream capture,
so inside the cpu device's capture that read is a host sync, which the device rightly refuses. Piecewise
runs the forward compiled, where transformers skips the read.
"""

from __future__ import annotations

import pytest
import torch

from runners import DecodeConfig, DecodeRunner, InputSlot

transformers = pytest.importorskip("transformers")

WINDOW = 8
BUCKETS = [1, 2, 4, 8]
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
MODES = [  # (mode, compiler): None is the mode's default (traced as it runs; piecewise: pieces as traced)
    ("full", None),
    ("breakable", None),
    ("piecewise", None),
    ("full", "inductor"),
    ("breakable", "inductor"),
    ("piecewise", "inductor"),
]
CPU_HOST_READ = (
    "transformers reads (packed_sequence_mask[:, -1] == 0).all() on the host (masking_utils."
    "find_packed_sequence_indices) unless it sees a compile or a CUDA stream capture: inside the cpu "
    "device's capture that is a host sync, which the reference device refuses"
)


def build_model(family: str, device: torch.device) -> torch.nn.Module:
    config_name, model_name = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval().to(device)


def window_step(model: torch.nn.Module):
    """A server's step: rows of ``WINDOW`` tokens each, positions per token, logits per token."""

    def step(*, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    return step


SLOTS = [
    InputSlot("input_ids", torch.int64, row_shape=(WINDOW,), fill=0),
    InputSlot("position_ids", torch.int64, row_shape=(WINDOW,), fill=0),
]


def window_batch(rows: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 200, (rows, 1), generator=generator)  # each request at its own position
    return {
        "input_ids": torch.randint(0, 256, (rows, WINDOW), generator=generator).to(device),
        "position_ids": (starts + torch.arange(WINDOW)).to(device),
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode,compiler", MODES, ids=[f"{m}-{c or 'default'}" for m, c in MODES])
def test_a_transformers_model_runs_in_every_mode_equal_to_eager(graph_device, family, mode, compiler):
    if graph_device == "cpu" and compiler == "inductor":
        pytest.skip("the cpu device records torch ops and cannot capture Inductor's kernels")
    if graph_device == "cpu" and mode != "piecewise":
        pytest.skip(CPU_HOST_READ)
    torch._dynamo.reset()
    device = torch.device(graph_device)
    model = build_model(family, device)
    step = window_step(model)
    config = DecodeConfig(mode=mode, compiler=compiler, max_bs=BUCKETS[-1], buckets=BUCKETS, show_progress=False)
    runner = DecodeRunner(step, SLOTS, graph_device, config)
    runner.capture()
    for seed, rows in enumerate([1, 3, 8, 5, 2, 8]):  # buckets and padded sizes, in no order
        batch = window_batch(rows, device, seed)
        with torch.no_grad():
            expected = step(**batch)
        torch.testing.assert_close(runner.run(batch), expected, rtol=0, atol=1e-5)
