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

import dataclasses
import random
from typing import Any, Hashable, Sequence

import torch

from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.sampling import SamplingParams
from graphhal.transformers import loop_defaults, request_checks
from graphhal.transformers.loop_admission import Admission
from graphhal.transformers.loop_batches import BatchBuilder
from graphhal.transformers.loop_requests import Request, tokens_cached
from graphhal.transformers.loop_results import Handout, Reads, RequestFailedError, StepResult
from graphhal.transformers.speculative_step import SpeculativeDecode
from runners import DecodeRunner, PrefillRunner

_KEEP = ["tokens", "logprobs"]  # the outputs a step hands back: never the vocabulary-wide logits


class GenerationLoop:
    """Continuous batching over ``decode`` and ``prefill`` runners that sample (``graphhal.transformers``'
    ``decode_runner`` and ``prefill_runner`` build them), sharing ``kv_cache``.

    eos_token_ids:     tokens that end a request (an int, a list, or None for none); default: the model's
                       ``generation_config.eos_token_id``.
    generation_config: the sampling defaults of requests added without ``sampling`` (``do_sample``,
                       ``temperature``, ``top_k``, ``top_p``, ``min_p``); default: the model's. Its fields the
                       loop does not apply (``repetition_penalty``...) are named in a warning.
    max_running:       the most requests decoding at once; default the decode runner's largest bucket.
    vocab_size, max_positions: what prompts are checked against (``request_checks.token_limits``); default:
                       read from the model the runners' steps hold.
    overlap:           prepare step n+1 while the device runs step n, reading tokens back one step late
                       (default); False reads every step's tokens before ``step`` returns. May be switched
                       between any two steps.
    seed:              the seed of the seeds given to requests whose sampling has none (``seed=None``): a loop
                       with the same seed, requests and order samples the same tokens.
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
        eos_token_ids: int | Sequence[int] | None = loop_defaults.FROM_MODEL,
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
        request_checks.check_runners_sample(decode, prefill)
        self.decode, self.prefill, self.kv_cache = decode, prefill, kv_cache
        self._drafts = drafter is not None
        self.overlap = not self._drafts if overlap is None else overlap
        # Read from the model the runners already hold: a second description of it could disagree with it.
        forwards = (decode.forward, prefill.forward)
        self.limits = request_checks.token_limits(forwards, kv_cache, vocab_size=vocab_size, max_positions=max_positions)
        config = generation_config if generation_config is not None else loop_defaults.generation_config(forwards)
        self.max_top_k = min(request_checks.max_top_k(runner.forward) for runner in (decode, prefill))
        self.default_sampling = loop_defaults.sampling_defaults(config, self.max_top_k)
        self.max_running = max_running or decode.config.max_size
        self.max_chunk_tokens = prefill.config.max_size  # the largest prefill bucket: every chunk replays a graph
        self.max_requests = prefill.config.max_requests
        self.batches = BatchBuilder(decode, prefill, kv_cache)
        self.speculation = None if drafter is None and verify is None else SpeculativeDecode(
            verify, drafter, num_draft_tokens, self.batches, self.limits.max_positions, kv_cache)  # type: ignore[arg-type]
        self.requests = Admission(kv_cache, self.batches, self.max_running, self.speculation and self.speculation.drafter.release)
        self.handout = Handout(loop_defaults.eos_ids(eos_token_ids, config), self.requests.finish)
        self._seeds = random.Random(seed)
        self._unread: list[Reads] = []  # the last step's tokens, on their way to the host
        self._last_decode: torch.Tensor | None = None  # the last decode step's sampled tokens, on the device

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.handout.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:  # tokens that end a request, from the next read on
        self.handout.eos_token_ids = frozenset(ids)

    @property
    def overlap(self) -> bool:
        """Whether step n+1 is queued before step n's tokens are read (switchable between any two steps)."""
        return self._overlap

    @overlap.setter
    def overlap(self, value: bool) -> None:
        if value and self._drafts:  # its requests would stop taking drafts, silently
            raise ValueError("GenerationLoop: a loop with a drafter reads every step back (its drafts follow the accepted tokens): overlap must be False")
        self._overlap = bool(value)

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing running, nothing still to read back."""
        return not self.requests.waiting and not self.requests.running and not self._unread

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (waiting for KV-cache blocks or a place in the batch)."""
        return len(self.requests.waiting)

    @property
    def num_running(self) -> int:
        """Requests admitted: prefilling or decoding, their blocks allocated."""
        return len(self.requests.running)

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
        sampling:  how it samples; default the loop's (the model's generation_config). Without a seed
                   (``seed=None``) the request gets one of its own from the loop's ``seed``.
        stop:      token sequences that end the request where its output ends with one (kept in the output).
        logprobs:  hand out each token's log-probability under the model (``StepResult.logprobs``).
        speculative: take drafts when the loop has a drafter (False: one token a step; see ``speculative_step``).

        A request the loop cannot serve is refused here, before it is queued, with a ``TypeError`` (an argument
        of the wrong kind) or a ``ValueError`` (ids outside the vocabulary, longer than the model's positions or
        the KV cache, sampling parameters the runners cannot honour, an id already queued or running) naming the
        request and the argument; nothing else is affected.
        """
        request_checks.check_request_id(request_id)
        self.requests.check_new(request_id)
        prompt = request_checks.token_ids(request_id, prompt)
        max_new_tokens = request_checks.new_token_count(request_id, max_new_tokens)
        stop = request_checks.stop_sequences(request_id, stop)
        if sampling is None:
            sampling = SamplingParams(**self.default_sampling)
        elif not isinstance(sampling, SamplingParams):
            raise TypeError(f"request {request_id!r}: sampling must be a graphhal.sampling.SamplingParams, got {type(sampling).__name__}")
        sampling.check(max_top_k=self.max_top_k, where=f"request {request_id!r}: sampling")
        self.limits.check(request_id, prompt, tokens_cached(len(prompt), max_new_tokens), max_new_tokens)
        self.requests.check_fits(request_id, len(prompt), max_new_tokens)
        if sampling.seed is None:  # one of its own: identical requests draw different tokens, the same run after run
            sampling = dataclasses.replace(sampling, seed=self._seeds.getrandbits(63))
        self.requests.queue(Request(request_id, prompt, max_new_tokens, sampling, stop, logprobs, speculative=bool(speculative)))

    def abort(self, request_id: Hashable) -> bool:
        """Drop a queued or running request between two steps; its blocks go back at once. Whether it was
        there. Tokens of it still on their way are discarded."""
        if self.requests.drop_waiting(request_id):
            return True
        request = self.requests.running_request(request_id)
        if request is None:
            return False
        self.requests.finish(request)
        self._unread = [reads for reads in self._unread if any(r.running for r, _ in reads.rows)]
        return True

    # --- a step ------------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Admit, queue one prefill batch and one decode batch, then hand out what the previous step sampled
        and, with ``overlap=False``, what this one sampled. See the module docstring.

        ``OutOfBlocksError`` when nothing is running and the first waiting request needs more blocks than are
        free (blocks held outside this loop): waiting would never end.
        """
        result = StepResult()
        self.requests.admit(in_flight=bool(self._unread))
        previous, self._unread = self._unread, []
        prefill_tokens = self._prefill(result)
        self._decode(prefill_tokens, result)
        current, self._unread = self._unread, []
        # The previous step's tokens first, whatever ``overlap`` is now (switched since?), then this step's if not.
        for reads in previous if self.overlap else previous + current:
            self.handout.read(reads, result)
        if self.overlap:  # left to read back: this step's tokens of requests still running (others discarded)
            self._unread = [reads for reads in current if any(r.running for r, _ in reads.rows)]
        return result

    def generate(self, prompts: Sequence[Any], max_new_tokens: int, *, sampling: SamplingParams | None = None) -> list[list[int]]:
        """Every prompt's generated tokens, in order: all added at once to an idle loop, stepped until done (a
        ``sampling`` without a seed gives each prompt a seed of its own).

        A request that failed raises its ``RequestFailedError`` (the first one's, in prompt order) once the
        others are done: the loop is idle again."""
        if not self.idle:
            raise RuntimeError("generate() runs a batch of its own: the loop still has requests queued or running")
        try:
            for index, prompt in enumerate(prompts):
                self.add(index, prompt, max_new_tokens, sampling=sampling)
        except (TypeError, ValueError):
            self.requests.clear_waiting()  # none has run: the loop is left as it was found
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

    def _prefill(self, result: StepResult) -> torch.Tensor | None:
        """Queue one batch of prompt chunks; the device tensor of its sampled tokens (one per request row), or
        None when no request completes its prompt in it (nothing to feed or read back)."""
        chunks = self.requests.prompt_chunks(self.max_chunk_tokens, self.max_requests)
        if not chunks:
            return None
        completing = [(r, row) for row, (r, take) in enumerate(chunks) if r.cached + take == len(r.prompt)]  # prompt done: 1st token
        keep = _KEEP if completing else []  # every chunk mid-prompt: its tokens are no one's, copy nothing out
        handle = self._submit("prefill", self.prefill, self.batches.prefill(chunks), [r for r, _ in chunks], result, keep)
        if handle is None:
            return None
        for request, take in chunks:
            request.cached += take
        for request, row in completing:
            request.scheduled, request.source = 1, ("prefill", row)
        if completing:  # nothing to read back (nor a host copy to queue) when no prompt ends here
            self._unread.append(Reads("prefill", completing, handle.to_host()))
        return handle.outputs["tokens"] if completing else None

    def _decode(self, prefill_tokens: torch.Tensor | None, result: StepResult) -> None:
        rows: list[Request] = []
        speculative: list[Request] = []
        rides = self.speculation.rides if self.speculation else None
        for request in self.requests.running:  # one pass: a list-membership test per row was quadratic
            if request.decodable:
                (speculative if rides is not None and rides(request) else rows).append(request)
        self._plain_decode(rows, prefill_tokens, result)
        if speculative:  # drafts, one verify step, its tokens read back and handed out
            self.speculation.step(  # type: ignore[union-attr]
                speculative, lambda *failed: self.handout.fail(*failed, result), lambda r, tokens: self.handout.tokens(r, tokens, result)
            )

    def _plain_decode(self, rows: list[Request], prefill_tokens: torch.Tensor | None, result: StepResult) -> None:
        handle = None
        if rows:
            input_ids = self.batches.fed_tokens(rows, self._last_decode, prefill_tokens)
            handle = self._submit("decode", self.decode, self.batches.decode(rows, input_ids), rows, result, _KEEP)
        self._last_decode = handle.outputs["tokens"] if handle is not None else None
        if handle is None:
            return
        for row, request in enumerate(rows):
            request.cached += 1
            request.scheduled += 1
            request.source = ("decode", row)
        self._unread.append(Reads("decode", list(zip(rows, range(len(rows)))), handle.to_host()))

    def _submit(self, phase: str, runner: Any, batch: dict[str, torch.Tensor], requests: list[Request], result: StepResult, keep: list[str]) -> Any:
        """``runner.submit(batch)``, or None after failing every request in it (``Handout.fail``)."""
        try:
            return runner.submit(batch, keep=keep)
        except Exception as error:
            self.handout.fail(phase, requests, error, result)
            return None
