"""The transformers families graphhal serves: greedy generation through graphhal's runners equals
``model.generate(do_sample=False)`` token for token, for each family, in every mode.

Each family is a tiny random model built from its config class (``support.transformers_models``: nothing is
downloaded). transformers generates each prompt alone with its own attention and cache; graphhal generates
them together through the generation loop: prefill in packed chunks (the 40-token prompt goes in two), decode
in padded buckets.

- cpu (CI): every family in every mode, float32; one model and one ``generate`` reference per family, shared
  by its modes; three prompts, eight new tokens, two buckets per phase: what a family can get wrong (its
  attention's inputs, norms, scalings, windows, experts) shows in the first tokens of any prompt.
- cuda: the same families and modes, with eight prompts and 32 tokens over the default buckets, plus
  Inductor-compiled forwards. Dense families in float32 (graphhal's attention kernels and SDPA round
  differently in bfloat16, which flips near-ties of a random model's logits). The mixture-of-experts families
  on cuda are in ``test_transformers_moe.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # before the integration, which imports it

from support.transformers_models import (  # noqa: E402
    FAMILIES,
    MODES,
    MOE_FAMILIES,
    build_model,
    generate_through_graphhal,
    generated_by_transformers,
    prompts,
)

DENSE_FAMILIES = sorted(set(FAMILIES) - set(MOE_FAMILIES))
# On cuda, also each dense family's forward compiled by Inductor in mode full, and Llama's in the other modes
# that take Inductor (a compile per runner is tens of seconds, so not every family in every mode).
CUDA_CASES = [
    *((family, mode, None) for family in DENSE_FAMILIES for mode in MODES),
    *((family, "full", "inductor") for family in DENSE_FAMILIES),
    ("llama", "breakable", "inductor"),
    ("llama", "piecewise", "inductor"),
]
CPU_PROMPTS = prompts((1, 12, 40))
CPU_NEW_TOKENS = 8
CUDA_PROMPTS = prompts((1, 5, 12, 40, 3, 70, 17, 8))
CUDA_NEW_TOKENS = 32
_models: dict[tuple[str, str], tuple[torch.nn.Module, list[list[int]]]] = {}


def model_and_expected(family: str, device: str, texts: list[list[int]], new_tokens: int) -> tuple[torch.nn.Module, list[list[int]]]:
    """``family``'s model on ``device`` and transformers' tokens, built once for all modes (the reference
    first: graphhal's attention then replaces transformers' in the model for good)."""
    if (family, device) not in _models:
        model = build_model(family, device)
        _models[family, device] = model, [generated_by_transformers(model, text, new_tokens) for text in texts]
    return _models[family, device]


# --- cpu: every family, every mode ------------------------------------------------------------------------


@pytest.mark.cpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_generates_what_transformers_generates_on_cpu(family, mode):
    model, expected = model_and_expected(family, "cpu", CPU_PROMPTS, CPU_NEW_TOKENS)
    got = generate_through_graphhal(
        model, "cpu", CPU_PROMPTS, CPU_NEW_TOKENS, mode, prefill_buckets=[16, 32], decode_buckets=[4, 8]
    )
    assert got == expected


# --- cuda ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("family,mode,compiler", CUDA_CASES, ids=[f"{f}-{m}-{c or 'default'}" for f, m, c in CUDA_CASES])
def test_each_family_generates_what_transformers_generates_on_cuda(family, mode, compiler):
    model, expected = model_and_expected(family, "cuda", CUDA_PROMPTS, CUDA_NEW_TOKENS)
    assert generate_through_graphhal(model, "cuda", CUDA_PROMPTS, CUDA_NEW_TOKENS, mode, compiler) == expected
