"""Speculative decoding on device graphs: drafters propose ``k`` tokens per request, a target step over
``q = 1 + k`` tokens per request verifies them on the device.

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

__all__ = ["DraftModelDrafter", "DraftRequest", "Drafter", "PromptLookupDrafter", "ReplayDrafter"]
