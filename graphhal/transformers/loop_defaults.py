"""What the generation loop takes from a model's ``generation_config``: the tokens that end a request, and the
sampling of requests added without their own, as ``generate`` reads them (unset fields filled in as it fills
them: top_k 50). The fields that change ``generate``'s tokens and that the loop's sampler does not apply
(``repetition_penalty``...) are named in a warning when the loop is built, not silently dropped.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from graphhal.transformers.request_checks import models_of

logger = logging.getLogger(__name__)

FROM_MODEL: Any = object()  # GenerationLoop's eos_token_ids: read from the model's generation_config


def eos_ids(eos_token_ids: Any, config: Any) -> frozenset[int]:
    """The tokens that end a request: ``eos_token_ids`` (an int, a sequence, or None for none), or ``FROM_MODEL``
    for the generation_config's ``eos_token_id``."""
    if eos_token_ids is FROM_MODEL:
        eos_token_ids = getattr(config, "eos_token_id", None)
    return frozenset([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids or ())


def generation_config(forwards: Iterable[Any]) -> Any:
    """The ``generation_config`` of the model the forwards hold (transformers keeps one per model), or None."""
    return next((model.generation_config for model in models_of(forwards) if hasattr(model, "generation_config")), None)


# What ``generate`` uses for a sampling field a generation_config leaves unset (transformers 5 leaves unset
# fields None and fills them from ``GenerationConfig._get_default_generation_params``: top_k 50, not off).
_GENERATE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}
# Fields of a generation_config that change what ``generate`` samples and that the loop's sampler does not
# apply, with the value that leaves them off.
_NOT_APPLIED = {
    "repetition_penalty": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "num_beams": 1,
}


def default_sampling(config: Any) -> dict[str, Any]:
    """``SamplingParams`` fields from a transformers ``GenerationConfig`` (or anything with its attributes):
    greedy unless ``do_sample``; then its temperature, top_k, top_p and min_p, each unset one as ``generate``
    fills it in (top_k 50)."""
    if config is None or not getattr(config, "do_sample", False):
        return {"temperature": 0.0}
    fields = dict(_GENERATE_DEFAULTS)
    for name in fields:
        value = getattr(config, name, None)
        if value is not None:
            fields[name] = value
    return fields


def defaults_not_applied(config: Any) -> list[str]:
    """The fields of a generation_config, set away from their neutral value, that change ``generate``'s tokens
    and that the loop does not apply (``name=value`` each): a loop built with them says so."""
    if config is None:
        return []
    return [
        f"{name}={value!r}"
        for name, neutral in _NOT_APPLIED.items()
        if (value := getattr(config, name, None)) is not None and value != neutral
    ]


def sampling_defaults(config: Any, max_top_k: int) -> dict[str, Any]:
    """``default_sampling(config)`` for a loop whose runners serve top_k up to ``max_top_k``: a warning (once,
    when the loop is built) naming the fields of ``config`` it does not apply, and a ValueError when the
    default top_k is more than the runners serve (else every request added without sampling would be refused)."""
    not_applied = defaults_not_applied(config)
    if not_applied:
        logger.warning(
            "graphhal: GenerationLoop takes its sampling defaults from a generation_config and does not apply %s: "
            "its tokens can differ from generate()'s (pass GenerationLoop(generation_config=...) without them to "
            "silence this)", ", ".join(not_applied),
        )
    defaults = default_sampling(config)
    top_k = defaults.get("top_k", 0)
    if top_k > max_top_k:
        unset = "unset, so generate's default: " if getattr(config, "top_k", None) is None else ""
        raise ValueError(
            f"GenerationLoop: the sampling default generation_config.top_k ({unset}{top_k}) is more than the runners' "
            f"max_top_k ({max_top_k}), the largest top_k their graphs serve: build the runners with max_top_k >= {top_k} "
            f"(decode_runner(..., max_top_k=...) and prefill_runner(..., max_top_k=...)), or pass "
            f"GenerationLoop(generation_config=...) with top_k <= {max_top_k} (or do_sample=False) and give requests "
            "their own sampling="
        )
    return defaults
