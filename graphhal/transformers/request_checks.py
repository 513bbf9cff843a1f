"""What the generation loop accepts as a request, checked before the request is queued.

A request that gets into a step and cannot run there fails that step for every request batched with it: an
out-of-range token id is an ``IndexError`` in the embedding on cpu and a device-side assert on CUDA, which
ends the process. So everything one request can get wrong is refused by ``GenerationLoop.add``, naming the
request and the argument:

- ``token_ids``: the prompt as a list of ints, from what a user would pass (a list or tuple of ints, a 1-D
  integer tensor, a 1-D numpy integer array); floats, bools, strings, nested lists and 2-D tensors refused;
- ``new_token_count``: ``max_new_tokens`` as an int of at least 1;
- ``TokenLimits``: the ids and positions the model can embed (``token_limits``), against which each
  request's ids and length are checked.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from graphhal.paged_attention.kv_cache import PagedKVCache

# A learned position table may have a few rows more than the positions it embeds: OPT keeps 2 in front.
_POSITION_TABLE_SPARE_ROWS = 2


def check_runners_sample(decode: Any, prefill: Any) -> None:
    """TypeError unless both runners sample inside their steps (their slots include the sampling slots)."""
    from graphhal.sampling import SAMPLING_SLOT_NAMES

    for name, runner in (("decode", decode), ("prefill", prefill)):
        if not set(SAMPLING_SLOT_NAMES) <= {slot.name for slot in runner.slots}:
            raise TypeError(
                f"the {name} runner does not sample (its slots lack {', '.join(SAMPLING_SLOT_NAMES)}): build it "
                f"with graphhal.transformers.{name}_runner, or wrap its step in graphhal.sampling's sampled steps"
            )


def check_request_id(request_id: Any) -> Hashable:
    try:
        hash(request_id)
    except TypeError:
        raise TypeError(
            f"request_id must be hashable (a str, an int, a tuple...), got {type(request_id).__name__} {request_id!r}"
        ) from None
    return request_id


def token_ids(request_id: Hashable, prompt: Any) -> list[int]:
    """The prompt's token ids as Python ints, or a TypeError (a value of the wrong kind) or ValueError (of the
    wrong shape) naming the request and the prompt."""
    where = f"request {request_id!r}: prompt"
    if isinstance(prompt, (str, bytes, bytearray)):
        raise TypeError(f"{where} is a {type(prompt).__name__}, not token ids: tokenize the text first")
    if isinstance(prompt, (Mapping, AbstractSet)):
        raise TypeError(f"{where} is a {type(prompt).__name__}; token ids come in order: a list, a tuple or a 1-D tensor")
    if hasattr(prompt, "ndim") and hasattr(prompt, "tolist"):  # a tensor or a numpy array
        if prompt.ndim != 1:
            raise ValueError(f"{where} is a {prompt.ndim}-D {type(prompt).__name__} of shape {tuple(prompt.shape)}; pass one request's ids, 1-D")
        if not _integer_dtype(prompt.dtype):
            raise TypeError(f"{where} is a {type(prompt).__name__} of {prompt.dtype}; token ids are integers")
        prompt = prompt.tolist()
    elif not isinstance(prompt, Iterable):
        raise TypeError(f"{where} must be a sequence of token ids (a list of ints, a 1-D integer tensor), got {type(prompt).__name__}")
    ids = []
    for index, token in enumerate(prompt):
        as_int = _as_int(token)
        if as_int is None:
            raise TypeError(
                f"{where}[{index}] is {token!r} ({type(token).__name__}); token ids are integers "
                "(a list or tuple of ints, a 1-D integer tensor or array)"
            )
        ids.append(as_int)
    if not ids:
        raise ValueError(f"request {request_id!r} has an empty prompt; it needs at least one token")
    return ids


def new_token_count(request_id: Hashable, max_new_tokens: Any) -> int:
    count = _as_int(max_new_tokens)
    if count is None:
        raise TypeError(
            f"request {request_id!r}: max_new_tokens must be an integer, got {max_new_tokens!r} ({type(max_new_tokens).__name__})"
        )
    if count < 1:
        raise ValueError(f"request {request_id!r}: max_new_tokens must be at least 1, got {count}")
    return count


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (a Python or numpy int, a 0-d integer tensor); None for anything
    else, bools included (numpy's bool type is named ``bool`` or ``bool_``, and has no common base with ours)."""
    if type(value).__name__ in ("bool", "bool_") or isinstance(value, torch.Tensor) and not _integer_dtype(value.dtype):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _integer_dtype(dtype: Any) -> bool:
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return getattr(dtype, "kind", None) in ("i", "u")  # numpy: signed or unsigned integers, not bools ("b")


@dataclass(frozen=True)
class TokenLimits:
    """The token ids and positions a model can embed, and where each limit comes from (for messages).

    vocab_size:    token ids go from 0 to ``vocab_size - 1``.
    max_positions: positions go from 0 to ``max_positions - 1``; None where the model computes its positions
                   (rotary) rather than reading them from a table: then only the KV cache bounds a request.
    """

    vocab_size: int
    vocab_source: str
    max_positions: int | None = None
    positions_source: str = ""

    def check(self, request_id: Hashable, ids: list[int], tokens_cached: int, max_new_tokens: int) -> None:
        if min(ids) < 0 or max(ids) >= self.vocab_size:  # min and max first: a long prompt at C speed
            index, token = next((i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size)
            raise ValueError(
                f"request {request_id!r}: prompt[{index}] is token id {token}, outside the vocabulary: "
                f"{self.vocab_source} has ids 0 to {self.vocab_size - 1}"
            )
        if self.max_positions is not None and tokens_cached > self.max_positions:
            raise ValueError(
                f"request {request_id!r} feeds the model positions 0 to {tokens_cached - 1} (prompt {len(ids)} + "
                f"{max_new_tokens} new, the last never fed back); {self.positions_source} embeds positions 0 to "
                f"{self.max_positions - 1} only: shorten the prompt or max_new_tokens"
            )


def token_limits(
    forwards: Iterable[Any], kv_cache: PagedKVCache, *, vocab_size: int | None = None, max_positions: int | None = None
) -> TokenLimits:
    """The limits of the model the runners' ``forwards`` hold (graphhal's steps keep it as ``.model``: the
    transformers ones and the reference model's), the tighter where they hold two; explicit values win.

    Without a model to read, the vocabulary is the KV cache's config's (it was shaped from the model's config)
    and positions have no limit but the cache's."""
    for name, value in (("vocab_size", vocab_size), ("max_positions", max_positions)):
        if value is not None and (_as_int(value) is None or value < 1):
            raise ValueError(f"GenerationLoop: {name} must be a positive integer (or None to read it from the model), got {value!r}")
    vocab = (kv_cache.config.vocab_size, "the KV cache's model config")
    positions: tuple[int | None, str] = (None, "")
    seen: set[int] = set()
    for model in models_of(forwards):
        if id(model) in seen:
            continue
        first = not seen
        seen.add(id(model))
        model_vocab = _vocabulary(model)
        if model_vocab is not None and (first or model_vocab[0] < vocab[0]):
            vocab = model_vocab
        table = _position_table(model)
        if table is not None and (positions[0] is None or table[0] < positions[0]):
            positions = table
    if vocab_size is not None:
        vocab = (vocab_size, "the loop's vocab_size")
    if max_positions is not None:
        positions = (max_positions, "the loop's max_positions")
    return TokenLimits(vocab[0], vocab[1], positions[0], positions[1])


def models_of(forwards: Iterable[Any]) -> list[torch.nn.Module]:
    """The models the runners' forwards hold: graphhal's steps keep theirs as ``.model``, and a sampled step
    wraps the model's step as ``.forward``."""
    models = []
    for forward in forwards:
        while forward is not None and not isinstance(getattr(forward, "model", None), torch.nn.Module):
            forward = getattr(forward, "forward", None) if not isinstance(forward, torch.nn.Module) else None
        if forward is not None:
            models.append(forward.model)
    return models


def max_top_k(forward: Any) -> int:
    """The largest top_k a sampled step's graphs serve (``graphhal.sampling.SampledStep.max_top_k``)."""
    from graphhal.sampling import DEFAULT_MAX_TOP_K

    return getattr(forward, "max_top_k", DEFAULT_MAX_TOP_K)


def stop_sequences(request_id: Hashable, stop: Any) -> tuple[tuple[int, ...], ...]:
    """The stop sequences as tuples of ints: a list (or tuple) of token-id sequences, each non-empty."""
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
        raise TypeError(f"request {request_id!r}: stop must be a list of token-id sequences, e.g. [[13, 13]], got {stop!r}")
    sequences = []
    for index, sequence in enumerate(stop):
        if _as_int(sequence) is not None:
            raise TypeError(f"request {request_id!r}: stop[{index}] is {sequence!r}; each stop is a sequence of token ids ([13], not 13)")
        try:
            ids = token_ids(request_id, sequence)
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace(": prompt", f": stop[{index}]").replace("prompt", f"stop[{index}]")) from None
        sequences.append(tuple(ids))
    return tuple(sequences)


def _vocabulary(model: torch.nn.Module) -> tuple[int, str] | None:
    """The rows of the model's token embedding (transformers' ``get_input_embeddings``), else its config's
    ``vocab_size``: the ids that index a row."""
    name = type(model).__name__
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, torch.nn.Embedding):
        return embeddings.num_embeddings, f"{name}'s token embedding"
    vocab = getattr(_text_config(model), "vocab_size", None)
    return (vocab, f"{name}'s config (vocab_size)") if isinstance(vocab, int) else None


def _position_table(model: torch.nn.Module) -> tuple[int, str] | None:
    """``max_position_embeddings`` where the model looks its positions up in a learned table: an embedding of
    that many rows (or a few more) beside the token embedding (GPT-2's ``wpe``, OPT's ``embed_positions``).
    A rotary model has no such table and no such limit: it computes every position's rotation."""
    longest = getattr(_text_config(model), "max_position_embeddings", None)
    if not isinstance(longest, int) or not hasattr(model, "get_input_embeddings"):
        return None
    tokens = model.get_input_embeddings()
    for path, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Embedding)
            and module is not tokens
            and longest <= module.num_embeddings <= longest + _POSITION_TABLE_SPARE_ROWS
        ):
            return longest, f"{type(model).__name__} (a learned position table, {path}, max_position_embeddings={longest})"
    return None


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config
