"""The generation loop's speculative decode step: drafts, one verify step of ``q = 1 + k`` tokens per request,
the accepted tokens read back once per step.

    loop = GenerationLoop(decode, prefill, kv_cache, drafter=PromptLookupDrafter(), verify=verify, num_draft_tokens=k)

Each step, every request that rides it (see ``rides``) gets ``k`` drafts from the drafter
(``graphhal.speculative``), and one replay of the verify runner (a ``DecodeRunner`` with ``query_tokens = 1 + k``
in the loop's pool: ``decode_runner(model, kv_cache, device, DecodeConfig(query_tokens=1 + k), sampling=False,
greedy_verify=True)``) feeds ``[last token, draft_1 .. draft_k]`` at the positions after what the request has
cached, and decides on the device (``greedy_verify``) how many drafts are the target's own greedy tokens. The
tokens it hands back per request, ``accepted + 1`` of them, are read back to the host once per step, for all
requests together: the host needs them (and their count) to place the next step's tokens and to draft.
Keys and values of rejected drafts are not rolled back: the request's cached length
counts only the accepted ones, and the next step writes over the rest.

What overlap it keeps: the prefill batch and the plain decode rows of a step are queued before the drafts and
the verify step, and the drafts of a draft model are fed from step to step on the device; the host then waits
for the verify step's tokens before the step returns (a loop with a drafter reads every step back before
returning, ``overlap=False``). Drafting for step n+1 cannot start before step n's accepted counts are known.

Greedy only: verification compares drafts with the argmax. A request that samples, asks for
log-probabilities, opts out (``add(..., speculative=False)``), whose first token is still on its way from the
prefill, that has one token left to generate, or whose drafts would run past its KV cache rows or the model's
positions, runs the plain decode step of one token in the same loop step instead: same tokens, no drafts.

A drafter that raises costs the step its drafts, not its requests: they are verified with filler drafts
(``without_drafts``), counted in ``drafter_failures`` and logged once with the exception.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.speculative.drafter import Drafter, DraftRequest, check_draft_count
from graphhal.speculative.verify import GreedyVerifyStep
from graphhal.transformers.loop_batches import BatchBuilder
from graphhal.transformers.loop_requests import Request
from runners import DecodeRunner

logger = logging.getLogger(__name__)


class SpeculativeDecode:
    """A loop's verify runner and drafter; counts what was drafted and accepted (``acceptance_rate``)."""

    def __init__(
        self, verify: DecodeRunner, drafter: Drafter, num_draft_tokens: int, batches: BatchBuilder, max_positions: int | None,
        kv_cache: PagedKVCache | None = None,
    ) -> None:
        k = check_draft_count(num_draft_tokens, "GenerationLoop")
        if not isinstance(verify, DecodeRunner) or getattr(verify, "query_tokens", 1) != 1 + k:
            raise ValueError(
                f"GenerationLoop: num_draft_tokens={k} verifies 1 + {k} tokens per request; the verify runner must be a "
                f"DecodeRunner with DecodeConfig(query_tokens={1 + k}) (graphhal.transformers.decode_runner(..., sampling=False, "
                f"greedy_verify=True) builds it), "
                f"got {type(verify).__name__} with query_tokens={getattr(verify, 'query_tokens', None)}"
            )
        check_verify_step(verify, k, batches, kv_cache)
        if not callable(getattr(drafter, "propose", None)) or not callable(getattr(drafter, "release", None)):
            raise TypeError(f"GenerationLoop: drafter must have propose() and release() (graphhal.speculative.Drafter), got {type(drafter).__name__}")
        self.verify, self.drafter, self.num_draft_tokens, self.batches = verify, drafter, k, batches
        self.longest = batches.max_blocks_per_seq * batches.block_size
        self.max_positions = max_positions
        self.verify_steps = 0  # verify replays (or eager runs)
        self.eager_verify_steps = 0  # of them, run eagerly (mode disabled, more requests than its graphs hold)
        self.verified_rows = 0  # requests verified, summed over the verify steps
        self.drafter_failures = 0  # steps whose drafter raised: their requests were verified without drafts
        # Drafts a request could keep (not past its max_new_tokens: those are verified, never kept), and of them
        # the accepted: an identical draft model accepts all of them.
        self.drafted = 0
        self.accepted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def rides(self, request: Request) -> bool:
        """Whether ``request`` takes this step's drafts: greedy, no log-probabilities, not opted out, its last
        token read back (the drafts follow it), more than one token left to generate (with one, no draft could
        be kept), and room for ``1 + k`` tokens in its cache rows and positions."""
        last = request.cached + self.num_draft_tokens  # the position of the last draft fed
        return (
            request.speculative
            and request.max_new_tokens - request.scheduled > 1
            and request.sampling.temperature == 0
            and not request.wants_logprobs
            and len(request.generated) == request.scheduled
            and last < self.longest
            and (self.max_positions is None or last < self.max_positions)
        )

    def step(
        self, rows: list[Request], fail: Callable[[str, list[Request], BaseException], None], hand_out: Callable[[Request, list[int]], None]
    ) -> None:
        """Draft for ``rows``, verify, wait, and hand each request its accepted tokens in order (``hand_out``
        ends a request at an end-of-sequence token or its last allowed token: the rest of its run is dropped).
        Drafting is an optimisation: a drafter that raises costs this step its drafts (``without_drafts``), not
        its requests. A verify run that raises fails every request of ``rows`` (``fail``)."""
        try:
            drafts = self.draft(rows)
        except Exception as error:
            drafts = self.without_drafts(rows, error)
        try:
            accepted = self.accepted_tokens(rows, self.submit(rows, drafts))
        except Exception as error:
            fail("verify", rows, error)
            return
        for request, tokens in zip(rows, accepted):
            request.source = ("host", tokens[-1])
            if request.running:
                hand_out(request, tokens)

    def draft(self, rows: list[Request]) -> torch.Tensor:
        """``[len(rows), k]`` drafts, checked."""
        asks = [DraftRequest(r.request_id, [*r.prompt, *r.generated], len(r.prompt) + r.max_new_tokens) for r in rows]
        drafts = self.drafter.propose(asks, self.num_draft_tokens)
        if not isinstance(drafts, torch.Tensor) or tuple(drafts.shape) != (len(rows), self.num_draft_tokens) or drafts.dtype != torch.int64:
            shape = tuple(drafts.shape) if isinstance(drafts, torch.Tensor) else type(drafts).__name__
            raise ValueError(f"{type(self.drafter).__name__}.propose returned {shape}; expected an int64 tensor of ({len(rows)}, {self.num_draft_tokens})")
        return drafts

    def without_drafts(self, rows: list[Request], error: Exception) -> torch.Tensor:
        """Fillers for a step whose drafter raised: each row's last token repeated, verified like drafts (one is
        kept only where it is the target's own greedy token, so the tokens stay generate's). The drafter
        forgets the rows (``release``): whatever it kept for them may be half updated; it starts afresh."""
        self.drafter_failures += 1
        if self.drafter_failures == 1:
            logger.warning(
                "graphhal: the drafter %s raised %s: %s; its %d request(s) were verified without drafts this step "
                "(GenerationLoop.speculation.drafter_failures counts every such step)",
                type(self.drafter).__name__, type(error).__name__, error, len(rows), exc_info=error,
            )
        for request in rows:
            try:
                self.drafter.release(request.request_id)
            except Exception:  # noqa: BLE001 - a drafter that cannot forget still leaves the request correct
                logger.debug("graphhal: the drafter's release(%r) raised", request.request_id, exc_info=True)
        return torch.tensor([[r.generated[-1]] * self.num_draft_tokens for r in rows], dtype=torch.int64)

    def submit(self, rows: list[Request], drafts: torch.Tensor) -> Any:
        """Queue the verify step of ``rows`` with their ``drafts``; the host copy of its tokens and counts."""
        device = self.batches.device
        q = 1 + self.num_draft_tokens
        last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.int64).unsqueeze(1)
        input_ids = torch.cat([last, drafts], 1) if drafts.device.type == "cpu" else torch.cat([last.to(device), drafts], 1)
        # Flat lists, a request's positions and slots a run at a time: a Python call per position cost more
        # than the rest of the step's host work at 16 requests.
        positions: list[int] = []
        slots: list[int] = []
        for request in rows:
            positions += range(request.cached, request.cached + q)
            slots += self.batches.slots_or_null(request, request.cached, q)
        batch = {
            "input_ids": input_ids,
            "positions": self.batches.host("positions", positions).view(len(rows), q),
            "seq_lens": self.batches.host("seq_lens", [r.cached + q for r in rows]),
            "block_tables": self.batches.block_tables(rows),
            "slot_mapping": self.batches.host("slot_mapping", slots).view(len(rows), q),
        }
        if not self.verify.can_run(len(rows)):  # the row count decides; the batch is checked once, by submit
            self.eager_verify_steps += 1
            if self.eager_verify_steps == 1:
                logger.warning(
                    "graphhal: a verify step of %d requests ran eagerly instead of replaying a graph (mode %s); "
                    "GenerationLoop.speculation.eager_verify_steps counts every such step", len(rows), self.verify.config.mode,
                )
        handle = self.verify.submit(batch, keep=["tokens", "num_tokens"])
        self.verify_steps += 1
        return handle.to_host()

    def accepted_tokens(self, rows: list[Request], copy: Any) -> list[list[int]]:
        """Wait for the verify step; each row's tokens (accepted drafts, then the target's next token). Every
        request's counts move past them: its cache holds its last token and the accepted drafts."""
        host = copy.wait()
        tokens, counts = host["tokens"].tolist(), host["num_tokens"].tolist()
        out = []
        for row, request in enumerate(rows):
            count = counts[row]
            keepable = min(self.num_draft_tokens, request.max_new_tokens - request.scheduled - 1)
            request.cached += count
            request.scheduled += count
            self.verified_rows += 1
            self.drafted += keepable
            self.accepted += min(count - 1, keepable)
            out.append(tokens[row][:count])
        return out


def check_verify_step(verify: DecodeRunner, k: int, batches: BatchBuilder, kv_cache: PagedKVCache | None) -> None:
    """TypeError unless ``verify`` runs a ``GreedyVerifyStep`` (a runner handing back logits, or sampling, cannot
    verify); ValueError unless its step writes the loop's KV cache (``kv_cache``, where the loop passes it), or at
    least one of the loop's block size and block-table width."""
    step = verify.forward
    if not isinstance(step, GreedyVerifyStep):
        raise TypeError(
            f"GenerationLoop: the verify runner must run a greedy-verify step (graphhal.speculative.GreedyVerifyStep), "
            f"got a step of {type(step).__name__}: build it with graphhal.transformers.decode_runner(model, kv_cache, "
            f"device, DecodeConfig(query_tokens={1 + k}), sampling=False, greedy_verify=True)"
        )
    cache = getattr(step.forward_step, "kv_cache", None)
    if not isinstance(cache, PagedKVCache):
        return  # a step that keeps its cache elsewhere: nothing to compare
    if (cache.block_size, cache.config.max_blocks_per_seq) != (batches.block_size, batches.max_blocks_per_seq):
        raise ValueError(
            f"GenerationLoop: the verify runner's KV cache has blocks of {cache.block_size} tokens and "
            f"{cache.config.max_blocks_per_seq} per request, the loop's {batches.block_size} and "
            f"{batches.max_blocks_per_seq}: build the verify runner over the loop's kv_cache"
        )
    if kv_cache is not None and cache is not kv_cache:
        raise ValueError(
            "GenerationLoop: the verify runner's step writes another KV cache than the loop's: build it over the "
            "loop's kv_cache (decode_runner(model, kv_cache, ...)), so that verified tokens land where the loop reads"
        )
