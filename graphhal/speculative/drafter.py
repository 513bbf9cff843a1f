"""The drafter interface: what a speculative decoding step asks of whatever proposes its draft tokens.

    drafts = drafter.propose([DraftRequest(id, tokens, max_len), ...], num_draft_tokens=k)   # [n, k] int64
    drafter.release(id)                                        # the request ended: drop what is kept for it

Every request of a step gets exactly ``k`` drafts (a uniform step of ``1 + k`` query tokens per request, the
shape the verify graphs are captured for). A drafter with fewer good guesses fills the rest with any token:
verification accepts only drafts equal to the target's own greedy choice, so a filler costs acceptance,
never correctness. Drafts may be host or device tensors; a device tensor must be memory the drafter's caller
owns (never a view into a graph pool that a later replay rewrites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class DraftRequest:
    """One request asking for drafts.

    tokens:  every token of the request so far, prompt then generated; the verify step feeds the last one
             first, then the drafts after it.
    max_len: the most tokens the request will ever hold (prompt + max_new_tokens). Its last token is never
             fed, so a drafter that caches keys and values needs ``max_len - 1`` positions per request, as the
             target's cache; drafts past them are never kept (they would pass max_new_tokens) and need no room.
    """

    request_id: Hashable
    tokens: Sequence[int]
    max_len: int


@runtime_checkable
class Drafter(Protocol):
    """Proposes ``k`` draft tokens per request for a verify step (``graphhal.speculative``'s drafters).

    eager_steps: model steps the drafter ran eagerly instead of replaying captured graphs (0 for host-side
                 drafters, which run no model): a server reads it to see a drafter that lost its graphs.
    """

    eager_steps: int

    def propose(self, requests: Sequence[DraftRequest], num_draft_tokens: int) -> torch.Tensor:
        """``[len(requests), num_draft_tokens]`` int64 drafts, one row per request in order."""
        ...

    def release(self, request_id: Hashable) -> None:
        """Forget ``request_id`` (finished, aborted or failed); a no-op for a request never seen."""
        ...


def check_draft_count(num_draft_tokens: int, where: str) -> int:
    """``num_draft_tokens`` if it is a positive int; a ValueError naming ``where`` otherwise."""
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
        raise ValueError(f"{where}: num_draft_tokens must be a positive int, got {num_draft_tokens!r}")
    return num_draft_tokens
