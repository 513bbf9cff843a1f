"""``ReplayDrafter``: drafts at a set acceptance rate, for measuring the speculative machinery (the bench).

Random weights make a real draft model's acceptance meaningless. This drafter proposes the target's own
greedy continuation, recorded by a plain run (every token the request would hold), and corrupts each draft
token independently with probability ``1 - acceptance`` (a seeded draw): a draft is accepted only while every
one before it was, so a verify step yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average (``k + 1`` at
``a = 1``). Past the recording's end it proposes the last token it has.
"""

from __future__ import annotations

import random
from typing import Hashable, Mapping, Sequence

import torch

from graphhal.speculative.drafter import DraftRequest, check_draft_count


class ReplayDrafter:
    """recorded:   ``{request_id: prompt + greedy generated tokens}`` of a plain run.
    acceptance: the probability that a draft token is left as recorded, in [0, 1]; fixed for the drafter's life
                (at 1 it draws nothing, so the draws a seed gives depend on it).
    vocab_size: corrupted tokens are drawn from ``range(vocab_size)``, never the recorded token.
    seed:       the draws' seed: the same seed, the same drafts."""

    eager_steps = 0  # runs no model

    def __init__(self, recorded: Mapping[Hashable, Sequence[int]], acceptance: float, vocab_size: int, *, seed: int = 0) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"ReplayDrafter: acceptance must be in [0, 1], got {acceptance!r}")
        if vocab_size < 2:
            raise ValueError(f"ReplayDrafter: vocab_size must be at least 2 (a corrupted token differs), got {vocab_size!r}")
        self.recorded = {request_id: list(tokens) for request_id, tokens in recorded.items()}
        self.acceptance, self.vocab_size = acceptance, vocab_size
        self._random = random.Random(seed)

    def propose(self, requests: Sequence[DraftRequest], num_draft_tokens: int) -> torch.Tensor:
        check_draft_count(num_draft_tokens, "ReplayDrafter")
        # One flat list and one tensor; at acceptance 1 no draw can corrupt a token, so none is drawn. The bench
        # takes this drafter's cost as nothing: its host time is kept to a list slice per request.
        drafts: list[int] = []
        for request in requests:
            recording = self.recorded.get(request.request_id)
            if recording is None:
                raise KeyError(f"ReplayDrafter: no recorded continuation for request {request.request_id!r}")
            at = len(request.tokens)
            row = recording[at : at + num_draft_tokens]
            row += [row[-1] if row else request.tokens[-1]] * (num_draft_tokens - len(row))
            drafts += row if self.acceptance >= 1.0 else self._corrupted(row)
        return torch.tensor(drafts, dtype=torch.int64).view(len(requests), num_draft_tokens)

    def _corrupted(self, row: list[int]) -> list[int]:
        """Each token kept with probability ``acceptance``, else replaced by another (a draw per token, one more
        per replaced token), in one loop over the row."""
        draw, other = self._random.random, self._random.randrange
        acceptance, vocab_size = self.acceptance, self.vocab_size
        return [token if draw() < acceptance else (token + 1 + other(vocab_size - 1)) % vocab_size for token in row]

    def release(self, request_id: Hashable) -> None:
        pass  # the recording stays: a bench may run the same requests again
