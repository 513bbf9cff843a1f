"""The transformers families ``graphhal bench --model`` can run, and their bench shapes.

On accelerators each is shaped like a 1B-class release of the family (random weights: nothing is
downloaded); on the cpu device a tiny one, for tests of the bench itself. Importing this module does not
import transformers; building a config does.
"""

from __future__ import annotations

from typing import Any

from graphhal.refmodel.config import ModelConfig

# Each family's 1B-class shape (Llama 3.2 1B, Qwen2.5 1.5B, and a Mistral-architecture model of Llama 3.2
# 1B's size), and a tiny one for the cpu device.
FAMILY_SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(
        config="LlamaConfig", model="LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "qwen2": dict(
        config="Qwen2Config", model="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "mistral": dict(
        config="MistralConfig", model="MistralForCausalLM", vocab_size=32768, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0, sliding_window=None,
    ),
}
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TRANSFORMERS_FAMILIES = tuple(FAMILY_SHAPES)
MAX_SEQ_LEN = 4096  # what the paged cache's block tables are sized for


def family_config(family: str, *, tiny: bool, num_layers: int | None = None) -> Any:
    """The transformers config of ``family``'s bench model (``tiny`` for the cpu device)."""
    import transformers

    shape = dict(FAMILY_SHAPES[family])
    config_class = getattr(transformers, shape.pop("config"))
    shape.pop("model")
    if tiny:
        shape.update(TINY)
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    return config_class(max_position_embeddings=MAX_SEQ_LEN, **shape)


def transformers_cache_shape(family: str, *, tiny: bool, num_layers: int | None = None) -> ModelConfig:
    """The paged cache's shape (a reference ``ModelConfig``) of ``family``'s bench model: the bench header's
    model fields and the prefill setup's sizes."""
    from graphhal.transformers import cache_shape

    return cache_shape(family_config(family, tiny=tiny, num_layers=num_layers), max_seq_len=MAX_SEQ_LEN)
