"""One request's state in the generation loop: what the host has scheduled for it, and what it has read back.

With overlapped steps the two differ: the device samples a request's token at step n, feeds it into step n+1,
and the host reads it back while step n+1 runs. ``scheduled`` counts the tokens sampled on the device (read
back or not), ``generated`` holds those the host has read; ``source`` says where the last sampled token is,
so the next step takes it from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

from graphhal.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


def tokens_cached(prompt_len: int, max_new_tokens: int) -> int:
    """The most tokens a request puts in the cache: its last generated token is never fed back."""
    return prompt_len + max_new_tokens - 1


@dataclass(eq=False)
class Request:
    request_id: Hashable
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[tuple[int, ...], ...] = ()
    wants_logprobs: bool = False
    generated: list[int] = field(default_factory=list)  # read back by the host
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values the device was asked to write
    scheduled: int = 0  # tokens sampled on the device, read back or not
    # ("prefill" or "decode", row): the step output holding the last one; ("host", token) once it was read back
    source: tuple[str, int] | None = None
    running: bool = False  # admitted, and neither finished nor failed
    speculative: bool = True  # takes drafts when the loop has a drafter
    # Its row of a batch's block table (``BatchBuilder.block_tables``), with the ``blocks`` list and length it
    # was made from: blocks are allocated once, at admission, so the row is made once, not once a step. A host
    # tensor only ever read (stacked into each step's new table), never handed to a runner itself.
    block_row: tuple[list[int], int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    @property
    def decodable(self) -> bool:
        """Has a token to feed, and may sample another."""
        return self.running and not self.prefilling and 0 < self.scheduled < self.max_new_tokens

    def ended_by(self, token: int, eos_token_ids: frozenset[int]) -> bool:
        """Whether ``token``, just read back, ends the request: its last allowed token, an end-of-sequence
        token, or the last token of a stop sequence."""
        if len(self.generated) >= self.max_new_tokens or token in eos_token_ids:
            return True
        return any(self.generated[-len(stop):] == list(stop) for stop in self.stop if len(stop) <= len(self.generated))
