"""Speculative decoding on device graphs: drafters propose ``k`` tokens per request, a target step over
``q = 1 + k`` tokens per request verifies them on the device.

The core (this package's ``verify``, with ``runners.DecodeConfig(query_tokens=q)`` and the q > 1 decode steps of
``graphhal.refmodel`` and ``graphhal.transformers``):

    slots = decode_input_slots(layout, query_tokens=1 + k)          # per-token slots: rows of (1 + k,)
    verify = DecodeRunner(GreedyVerifyStep(model.decode_forward(kv_cache)), slots, device,
                          DecodeConfig(max_bs=64, query_tokens=1 + k), pool=decode.pool)
    out = verify.run(batch)              # {"accepted": [n], "tokens": [n, 1 + k], "num_tokens": [n]}
    next_context = context_lens_after(batch["seq_lens"], out["num_tokens"], 1 + k)

A batch row is one request: ``input_ids[r] = [last accepted token, draft_1 .. draft_k]`` at
``positions[r] = context_len + 0..k``, writing ``slot_mapping[r]``; ``seq_lens[r] = context_len + 1 + k``.
Padding adds whole requests (a padded request attends to nothing and writes the null slot); runners at
several ``k`` share one graph pool. Greedy acceptance is the longest prefix of drafts equal to the target's
argmax, plus the bonus token, computed without a host round trip (``greedy_verify``).

The drafters (each in its own module):

- ``drafter``: the ``Drafter`` interface and ``DraftRequest``;
- ``prompt_lookup``: ``PromptLookupDrafter``, n-gram matching in the request's own tokens (host-side);
- ``draft_model``: ``DraftModelDrafter``, a smaller model through runners of its own, graphs in the target's pool;
- ``replay_drafter``: ``ReplayDrafter``, a recorded continuation corrupted at a set rate (the bench's).

The generation loop's speculative step: ``graphhal.transformers.speculative_step``.
"""

from graphhal.speculative.draft_model import DraftModelDrafter
from graphhal.speculative.drafter import Drafter, DraftRequest
from graphhal.speculative.prompt_lookup import PromptLookupDrafter
from graphhal.speculative.replay_drafter import ReplayDrafter
from graphhal.speculative.verify import (
    GreedyVerifyStep,
    VerifyResult,
    accepted_token_mask,
    context_lens_after,
    greedy_tokens,
    greedy_verify,
)

__all__ = [
    "DraftModelDrafter",
    "DraftRequest",
    "Drafter",
    "GreedyVerifyStep",
    "PromptLookupDrafter",
    "ReplayDrafter",
    "VerifyResult",
    "accepted_token_mask",
    "context_lens_after",
    "greedy_tokens",
    "greedy_verify",
]
