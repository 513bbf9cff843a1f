"""Generation with continuous batching and overlapped steps: a small server loop over a decode and a prefill runner.

    loop = GenerationLoop(decode, prefill, kv_cache)        # eos and sampling defaults: the model's generation_config
    loop.add("a", prompt_ids, max_new_tokens=32)            # TypeError/ValueError for a request it cannot serve
    loop.add("b", prompt_ids, max_new_tokens=32, sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=7))
    while not loop.idle:
        result = loop.step()
        result.tokens         # {request_id: [new tokens]}, as they are read back: stream them
        result                # the dict itself: {request_id: every generated token} of the requests that finished
        result.failed         # {request_id: RequestFailedError}: those a failed run dropped

Each ``step`` does what a serving engine's scheduler does:

1. admit waiting requests, first come first served, while the KV cache has blocks for a whole request
   (prompt and every token it may generate: no request is ever preempted) and the batch has room;
2. prefill: pack the prompt tokens not yet cached into one batch of at most the prefill runner's largest
   bucket (a long prompt goes in chunks over several steps); a request whose prompt is complete samples its
   first token from its last token's logits, inside the prefill graph;
3. decode: every request with a token to feed runs one decode step together, sampling its next token inside
   the decode graph. The token fed is the one the request sampled last, taken on the device from the step
   that sampled it: the host never sees a token before the device uses it;
4. read back, one step late: the tokens of the previous step, copied to the host while this step runs, are
   handed out (``StepResult.tokens``) and checked for the end of each request.

So the host prepares step n+1 while the device runs step n, and the device never waits for the host: what the
overlap schedulers of vLLM, SGLang and TensorRT-LLM do. The cost of reading one step late: a request that
ended at step n (an end-of-sequence token) has already been scheduled for step n+1, whose token for it is
discarded; its KV-cache blocks go back as soon as the host sees the end (the device's queued work runs in
order, so a later request reusing them cannot see its writes). ``overlap=False`` reads every step's tokens
before returning: the synchronous loop, for comparison.

A request ends after ``max_new_tokens`` tokens, at an end-of-sequence token, or at the end of one of its stop
sequences (each kept in its output, as ``generate`` keeps the eos token). Sampling per request
(``graphhal.sampling.SamplingParams``: greedy, temperature, top-k, top-p, min-p, a seed), with the model's
``generation_config`` as the default; greedy decoding is the argmax, first index on ties, as
``generate(do_sample=False)``. A request can be aborted between any two steps; its blocks go back at once.

What one request can get wrong is refused by ``add`` (``graphhal.transformers.request_checks``). A run that
fails anyway (a device error, a model's own exception) cannot say which of its requests caused it: every
request in that run fails, its blocks go back, and the step reports it in ``StepResult.failed``.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any, Hashable, Sequence

import torch

import hal
from graphhal.paged_attention.block_allocator import OutOfBlocksError
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.sampling import SAMPLING_SLOT_NAMES, SamplingParams
from graphhal.transformers import request_checks
from graphhal.transformers.loop_batches import BatchBuilder
from graphhal.transformers.loop_requests import Request, tokens_cached
from graphhal.transformers.loop_results import Reads, RequestFailedError, StepResult
from graphhal.transformers.speculative_step import SpeculativeDecode
from runners import DecodeRunner, PrefillRunner

logger = logging.getLogger(__name__)

_FROM_MODEL: Any = object()  # eos_token_ids: read from the model's generation_config


class GenerationLoop:
    """Continuous batching over ``decode`` and ``prefill`` runners that sample (``graphhal.transformers``'
    ``decode_runner`` and ``prefill_runner`` build them), sharing ``kv_cache``.

    eos_token_ids:     tokens that end a request (an int, a list, or None for none); default: the model's
                       ``generation_config.eos_token_id``.
    generation_config: the sampling defaults of requests added without ``sampling`` (``do_sample``,
                       ``temperature``, ``top_k``, ``top_p``, ``min_p``); default: the model's.
    max_running:       the most requests decoding at once; default the decode runner's largest bucket.
    vocab_size, max_positions: what prompts are checked against (``request_checks.token_limits``); default:
                       read from the model the runners' steps hold.
    overlap:           prepare step n+1 while the device runs step n, reading tokens back one step late
                       (default); False reads every step's tokens before ``step`` returns.
    seed:              the seed of the seeds given to requests added without one: a loop with the same seed,
                       requests and order samples the same tokens.
    drafter, verify, num_draft_tokens: speculative decoding (``graphhal.transformers.speculative_step``): a
                       ``graphhal.speculative`` drafter proposes ``num_draft_tokens`` tokens a request, the
                       ``verify`` runner (``query_tokens = 1 + num_draft_tokens``) checks them; implies
                       ``overlap=False``. ``speculation`` then holds the counts (``acceptance_rate``).
    """

    def __init__(
        self,
        decode: DecodeRunner,
        prefill: PrefillRunner,
        kv_cache: PagedKVCache,
        *,
        eos_token_ids: int | Sequence[int] | None = _FROM_MODEL,
        generation_config: Any = None,
        max_running: int | None = None,
        vocab_size: int | None = None,
        max_positions: int | None = None,
        overlap: bool | None = None,
        seed: int = 0,
        drafter: Any = None,
        verify: DecodeRunner | None = None,
        num_draft_tokens: int | None = None,
    ) -> None:
        for name, runner in (("decode", decode), ("prefill", prefill)):
            if not set(SAMPLING_SLOT_NAMES) <= {slot.name for slot in runner.slots}:
                raise TypeError(
                    f"the {name} runner does not sample (its slots lack {', '.join(SAMPLING_SLOT_NAMES)}): build it "
                    f"with graphhal.transformers.{name}_runner, or wrap its step in graphhal.sampling's sampled steps"
                )
        self.decode, self.prefill, self.kv_cache = decode, prefill, kv_cache
        if drafter is not None and overlap:
            raise ValueError("GenerationLoop: a loop with a drafter reads every step back (its drafts follow the accepted tokens): overlap must be False")
        self.overlap = drafter is None if overlap is None else overlap
        # Read from the model the runners already hold: a second description of it could disagree with it.
        forwards = (decode.forward, prefill.forward)
        self.limits = request_checks.token_limits(forwards, kv_cache, vocab_size=vocab_size, max_positions=max_positions)
        config = generation_config if generation_config is not None else request_checks.generation_config(forwards)
        if eos_token_ids is _FROM_MODEL:
            eos_token_ids = getattr(config, "eos_token_id", None)
        self.eos_token_ids = frozenset([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids or ())
        self.default_sampling = request_checks.default_sampling(config)
        self.max_top_k = min(request_checks.max_top_k(runner.forward) for runner in (decode, prefill))
        self.max_running = max_running or decode.config.max_size
        self.max_chunk_tokens = prefill.config.max_size  # the largest prefill bucket: every chunk replays a graph
        self.max_requests = prefill.config.max_requests
        self.batches = BatchBuilder(decode, prefill, kv_cache)
        self.speculation: SpeculativeDecode | None = None
        if drafter is not None or verify is not None:
            self.speculation = SpeculativeDecode(verify, drafter, num_draft_tokens, self.batches, self.limits.max_positions)  # type: ignore[arg-type]
        self._seeds = random.Random(seed)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._ids: set[Hashable] = set()
        self._unread: list[Reads] = []  # the last step's tokens, on their way to the host
        self._last_decode: tuple[torch.Tensor, dict[int, int]] | None = None  # its tokens; request id() -> row

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing running, nothing still to read back."""
        return not self._waiting and not self._running and not self._unread

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (waiting for KV-cache blocks or a place in the batch)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests admitted: prefilling or decoding, their blocks allocated."""
        return len(self._running)

    # --- requests ----------------------------------------------------------------------------------------

    def add(
        self,
        request_id: Hashable,
        prompt: Any,
        max_new_tokens: int,
        *,
        sampling: SamplingParams | None = None,
        stop: Sequence[Sequence[int]] = (),
        logprobs: bool = False,
        speculative: bool = True,
    ) -> None:
        """Queue a request: its prompt token ids and how many tokens to generate at most.

        prompt:    a list or tuple of ints, a 1-D integer tensor or numpy array.
        sampling:  how it samples; default the loop's (the model's generation_config), with a seed of its own.
        stop:      token sequences that end the request where its output ends with one (kept in the output).
        logprobs:  hand out each token's log-probability under the model (``StepResult.logprobs``).
        speculative: take drafts when the loop has a drafter (False: one token a step; see ``speculative_step``).

        A request the loop cannot serve is refused here, before it is queued, with a ``TypeError`` (an argument
        of the wrong kind) or a ``ValueError`` (ids outside the vocabulary, longer than the model's positions or
        the KV cache, sampling parameters the runners cannot honour, an id already queued or running) naming the
        request and the argument; nothing else is affected.
        """
        request_checks.check_request_id(request_id)
        if request_id in self._ids:
            raise ValueError(f"request {request_id!r} is already queued or running")
        prompt = request_checks.token_ids(request_id, prompt)
        max_new_tokens = request_checks.new_token_count(request_id, max_new_tokens)
        stop = request_checks.stop_sequences(request_id, stop)
        if sampling is None:
            sampling = SamplingParams(**{**self.default_sampling, "seed": self._seeds.getrandbits(63)})
        elif not isinstance(sampling, SamplingParams):
            raise TypeError(f"request {request_id!r}: sampling must be a graphhal.sampling.SamplingParams, got {type(sampling).__name__}")
        sampling.check(max_top_k=self.max_top_k, where=f"request {request_id!r}: sampling")
        cached = tokens_cached(len(prompt), max_new_tokens)
        self.limits.check(request_id, prompt, cached, max_new_tokens)
        longest = self.batches.max_blocks_per_seq * self.batches.block_size
        if cached > longest:
            raise ValueError(
                f"request {request_id!r} caches up to {cached} tokens (prompt {len(prompt)} + {max_new_tokens} new, "
                f"the last never fed back); the KV cache serves at most {longest} per request"
            )
        if self.batches.blocks_for(cached) > self.kv_cache.num_blocks - 1:
            raise ValueError(f"request {request_id!r} needs more KV-cache blocks than the whole cache has")
        self._ids.add(request_id)
        self._waiting.append(Request(request_id, prompt, max_new_tokens, sampling, stop, logprobs, speculative=bool(speculative)))

    def abort(self, request_id: Hashable) -> bool:
        """Drop a queued or running request between two steps; its blocks go back at once. Whether it was
        there. Tokens of it still on their way are discarded."""
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                self._ids.discard(request_id)
                return True
        for request in self._running:
            if request.request_id == request_id:
                self._finish(request)
                self._unread = [reads for reads in self._unread if any(r.running for r, _ in reads.rows)]
                return True
        return False

    # --- a step ------------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Admit, queue one prefill batch and one decode batch, then hand out what the previous step sampled
        (this step's, with ``overlap=False``). See the module docstring.

        ``OutOfBlocksError`` when nothing is running and the first waiting request needs more blocks than are
        free (blocks held outside this loop): waiting would never end.
        """
        result = StepResult()
        self._admit()
        previous, self._unread = self._unread, []
        prefill_tokens = self._prefill(result)
        self._decode(prefill_tokens, result)
        for reads in (self._unread if not self.overlap else previous):
            self._read(reads, result)
        # What is left to read back: this step's tokens, of requests still running (a failed or finished
        # request's are discarded unread).
        self._unread = [reads for reads in self._unread if self.overlap and any(r.running for r, _ in reads.rows)]
        return result

    def generate(self, prompts: Sequence[Any], max_new_tokens: int, *, sampling: SamplingParams | None = None) -> list[list[int]]:
        """Every prompt's generated tokens, in order: all added at once to an idle loop, stepped until done.

        A request that failed raises its ``RequestFailedError`` (the first one's, in prompt order) once the
        others are done: the loop is idle again."""
        if not self.idle:
            raise RuntimeError("generate() runs a batch of its own: the loop still has requests queued or running")
        try:
            for index, prompt in enumerate(prompts):
                self.add(index, prompt, max_new_tokens, sampling=sampling)
        except (TypeError, ValueError):
            for request in self._waiting:  # none has run: the loop is left as it was found
                self._ids.discard(request.request_id)
            self._waiting.clear()
            raise
        outputs: dict[Hashable, list[int]] = {}
        failed: dict[Hashable, RequestFailedError] = {}
        while not self.idle:
            result = self.step()
            outputs.update(result)
            failed.update(result.failed)
        if failed:
            raise failed[min(failed)]
        return [outputs[index] for index in range(len(prompts))]

    def _admit(self) -> None:
        allocator = self.kv_cache.allocator
        while self._waiting and len(self._running) < self.max_running:
            request = self._waiting[0]
            needed = self.batches.blocks_for(tokens_cached(len(request.prompt), request.max_new_tokens))
            if needed > allocator.num_free:
                if not self._running and not self._unread:  # nothing will free a block: it would wait for ever
                    raise OutOfBlocksError(
                        f"request {request.request_id!r} needs {needed} KV-cache blocks and only {allocator.num_free} are "
                        "free with no request of this loop running: blocks are held outside the loop"
                    )
                return  # first come, first served: later requests wait behind it
            request.blocks = allocator.allocate(needed)
            request.running = True
            self._running.append(self._waiting.popleft())

    def _prefill(self, result: StepResult) -> torch.Tensor | None:
        """Queue one batch of prompt chunks; the device tensor of its sampled tokens (one per request row), or
        None when nothing was prefilled."""
        chunks: list[tuple[Request, int]] = []  # (request, tokens of its prompt in this batch)
        budget = self.max_chunk_tokens
        for request in self._running:
            if not request.prefilling or budget == 0 or len(chunks) == self.max_requests:
                continue
            take = min(len(request.prompt) - request.cached, budget)
            chunks.append((request, take))
            budget -= take
        if not chunks:
            return None
        batch = self.batches.prefill(chunks)
        handle = self._submit("prefill", self.prefill, batch, [request for request, _ in chunks], result)
        if handle is None:
            return None
        completing = []
        for row, (request, take) in enumerate(chunks):
            request.cached += take
            if not request.prefilling:  # its whole prompt is cached: its last token's logits gave the first token
                request.scheduled, request.source = 1, ("prefill", row)
                completing.append((request, row))
        self._unread.append(Reads("prefill", completing, handle.to_host()))
        return handle.outputs["tokens"]

    def _decode(self, prefill_tokens: torch.Tensor | None, result: StepResult) -> None:
        rows = [request for request in self._running if request.decodable]
        speculative = [request for request in rows if self.speculation and self.speculation.rides(request)]
        rows = [request for request in rows if request not in speculative]
        self._plain_decode(rows, prefill_tokens, result)
        if speculative:  # drafts, one verify step, its tokens read back and handed out
            self.speculation.step(  # type: ignore[union-attr]
                speculative, lambda *failed: self._fail(*failed, result), lambda r, token: self._hand_out(r, token, None, result)
            )

    def _plain_decode(self, rows: list[Request], prefill_tokens: torch.Tensor | None, result: StepResult) -> None:
        if not rows:
            self._last_decode = None
            return
        input_ids = self.batches.fed_tokens(rows, self._last_decode, prefill_tokens)
        batch = self.batches.decode(rows, input_ids)
        handle = self._submit("decode", self.decode, batch, rows, result)
        if handle is None:
            self._last_decode = None
            return
        for row, request in enumerate(rows):
            request.cached += 1
            request.scheduled += 1
            request.source = ("decode", row)
        self._last_decode = (handle.outputs["tokens"], {id(request): row for row, request in enumerate(rows)})
        self._unread.append(Reads("decode", list(zip(rows, range(len(rows)))), handle.to_host()))

    def _submit(self, phase: str, runner: Any, batch: dict[str, torch.Tensor], requests: list[Request], result: StepResult) -> Any:
        """``runner.submit(batch)``, or None after failing every request in it: a run's exception cannot be
        pinned on one of its requests (what one request can get wrong, ``add`` refused)."""
        try:
            return runner.submit(batch, keep=["tokens", "logprobs"])
        except Exception as error:
            self._fail(phase, requests, error, result)
            return None

    def _read(self, reads: Reads, result: StepResult) -> None:
        """Hand out one run's tokens, now on the host; end the requests they end. On CUDA an error inside the
        run surfaces here, when its copy is waited on: it fails the run's requests."""
        try:
            host = reads.copy.wait()
            tokens, logprobs = host["tokens"].tolist(), host["logprobs"].tolist()
        except Exception as error:
            self._fail(reads.phase, [request for request, _ in reads.rows if request.running], error, result)
            return
        for request, row in reads.rows:
            if request.running:  # else ended (or aborted) while this run was queued: its token is discarded
                self._hand_out(request, tokens[row], logprobs[row], result)

    def _hand_out(self, request: Request, token: int, logprob: float | None, result: StepResult) -> None:
        request.generated.append(token)
        result.tokens.setdefault(request.request_id, []).append(token)
        if request.wants_logprobs:
            result.logprobs.setdefault(request.request_id, []).append(logprob)
        if request.ended_by(token, self.eos_token_ids):
            self._finish(request)
            result[request.request_id] = request.generated

    def _fail(self, phase: str, requests: list[Request], error: BaseException, result: StepResult) -> None:
        batch = [request.request_id for request in requests]
        for request in requests:
            failure = RequestFailedError(request.request_id, phase, batch, error)
            failure.__cause__ = error
            logger.error("graphhal: %s", failure)
            self._finish(request)
            result.failed[request.request_id] = failure

    def _finish(self, request: Request) -> None:
        """Take ``request`` out of the loop and give its blocks back (queued work that writes them runs first:
        the device runs its queue in order)."""
        if request.running:
            request.running = False
            self._running.remove(request)
            self._ids.discard(request.request_id)
            self.kv_cache.allocator.free(request.blocks)
            if self.speculation is not None:
                self.speculation.drafter.release(request.request_id)
