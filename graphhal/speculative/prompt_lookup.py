"""``PromptLookupDrafter``: drafts copied from the request's own tokens (prompt lookup decoding), host-side.

What transformers' ``PromptLookupCandidateGenerator`` does for ``generate(prompt_lookup_num_tokens=k,
max_matching_ngram_size=n)``, per request: for the n-gram ending the request's tokens, n from
``max_matching_ngram_size`` down to 1, find its first earlier occurrence (left to right) that has tokens
after it, and propose up to ``k`` of them, cut before the first end-of-sequence token. transformers then
verifies fewer candidates (none without a match); a uniform verify step needs exactly ``k`` per request, so
the missing ones are filled with the request's last token: a filler is accepted only where it happens to be
the target's greedy choice, and the output is the same either way.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch

from graphhal.speculative.drafter import DraftRequest, check_draft_count


class PromptLookupDrafter:
    """n-gram matching in each request's prompt and generated tokens; no model, no device work.

    max_matching_ngram_size: the longest n-gram matched (transformers' default 2).
    eos_token_ids:           tokens a proposal is cut before (as transformers cuts at its eos).
    """

    eager_steps = 0  # runs no model

    def __init__(self, max_matching_ngram_size: int = 2, eos_token_ids: Iterable[int] = ()) -> None:
        if not isinstance(max_matching_ngram_size, int) or max_matching_ngram_size < 1:
            raise ValueError(f"PromptLookupDrafter: max_matching_ngram_size must be a positive int, got {max_matching_ngram_size!r}")
        self.max_matching_ngram_size = max_matching_ngram_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.matched = 0  # proposals that found an n-gram (for a server's statistics)
        self.proposed = 0

    def propose(self, requests: Sequence[DraftRequest], num_draft_tokens: int) -> torch.Tensor:
        check_draft_count(num_draft_tokens, "PromptLookupDrafter")
        rows = []
        for request in requests:
            tokens = list(request.tokens)
            found = self.lookup(tokens, num_draft_tokens)
            self.proposed += 1
            self.matched += bool(found)
            rows.append(found + [tokens[-1]] * (num_draft_tokens - len(found)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(requests), num_draft_tokens)

    def lookup(self, tokens: list[int], num_draft_tokens: int) -> list[int]:
        """The continuation transformers' prompt lookup proposes for ``tokens`` (up to ``num_draft_tokens``,
        possibly none)."""
        length = len(tokens)
        for size in range(min(self.max_matching_ngram_size, length - 1), 0, -1):
            ngram = tokens[length - size :]
            first = ngram[0]
            for start in range(length - size):  # the ending n-gram itself has nothing after it
                if tokens[start] == first and tokens[start : start + size] == ngram:
                    found = tokens[start + size : start + size + num_draft_tokens]
                    for index, token in enumerate(found):
                        if token in self.eos_token_ids:
                            return found[:index]
                    return found
        return []

    def release(self, request_id: Hashable) -> None:
        pass  # keeps nothing per request
