"""Speculative decoding's machinery at a set acceptance (``graphhal bench --model llama --spec``).

    graphhal bench --model llama --spec             # a 1B-shaped Llama in bfloat16 on a GPU; tiny on cpu
    python3 -m graphhal.bench.speculative

Random weights make a real draft model's acceptance meaningless, so the loop is measured with a replay drafter
(``graphhal.speculative.ReplayDrafter``): it proposes the target's own greedy continuation, recorded by a plain
run of the same loop, each draft token corrupted with probability ``1 - a``. Per batch size (1, 16, 64 on a
GPU; every request a 32-token prompt and 128 new tokens) it prints:

- step costs (``graphhal.bench.speculative_steps``): the loop's plain decode step, the verify step at
  ``q = 1 + k`` for k = 1..4 (and its ratio to the plain step), and a 2-layer draft model's decode step (same
  vocabulary), timed together at a context of prompt + half the new tokens;
- the loop: the plain loop's tokens per second, then for every k and a = 0.6, 0.8, 1.0 the speculative loop's
  tokens per second, its tokens per verify step and request (exactly ``k + 1`` at a = 1.0; counted over the
  verify steps whose request had room for all ``k + 1``, not cut by ``max_new_tokens``), the ideal tokens
  per second predicted from the step costs, ``batch * (1 - a^(k+1)) / (1 - a) / verify_ms`` (the replay
  drafter costs nothing on the device), the measured share of it, and whether every request's tokens equal
  the plain run's. The share compares like with like: the ideal assumes ``batch`` requests in every verify
  step, each with room for ``k + 1`` tokens, so it is measured over the steps where that held (``full-batch
  tok/s``). The whole run's rate (``tok/s``) also pays the tail: below a = 1.0 requests finish at different
  steps, and the last steps verify fewer of them, a cost of the batch, not of the machinery;
- prompt lookup at batch 1 on a repetitive prompt: the loop with ``PromptLookupDrafter`` against transformers'
  ``generate(prompt_lookup_num_tokens=k)`` on the same weights, tokens per second.

Targets (issue 26): tokens per verify step exactly k + 1 at a = 1.0; measured at least 0.9x the ideal; the
verify step at q = 4 at most 1.2x the plain step at batch 1; prompt lookup at least 3x transformers'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import hal
from graphhal.bench.speculative_steps import StepCosts, time_steps
from graphhal.bench.timing import StepTimer, TimerSettings
from graphhal.bench.transformers_families import family_config
from graphhal.speculative import PromptLookupDrafter, ReplayDrafter
from graphhal.transformers import GenerationLoop, decode_runner, paged_kv_cache, prefill_runner
from graphhal.transformers.attention import use_graphhal_attention
from runners import DecodeConfig, PrefillConfig

K_VALUES = (1, 2, 3, 4)
ACCEPTANCES = (0.6, 0.8, 1.0)
PROMPT_TOKENS = 32
NEW_TOKENS = 128
LOOKUP_K = 4  # draft tokens a prompt-lookup step verifies (transformers' prompt_lookup_num_tokens)
DRAFT_LAYERS = 2
BLOCK_SIZE = 16


@dataclass
class LoopRate:
    """One timed run of the loop at ``batch`` requests; ``k`` 0 is the plain loop (no drafter)."""

    batch: int
    k: int
    acceptance: float | None
    tokens_per_s: float  # the whole run, its tail of fewer requests included
    tokens_per_verify: float | None = None  # per request and verify step: accepted drafts + 1
    ideal_tokens_per_s: float | None = None
    full_batch_tokens_per_s: float | None = None  # over the steps whose every request verified with k + 1 tokens' room
    same_tokens: bool | None = None  # every request's tokens equal the plain run's


@dataclass
class SpecBench:
    device: str
    dtype: torch.dtype
    model: str
    steps: list[StepCosts] = field(default_factory=list)
    loops: list[LoopRate] = field(default_factory=list)
    lookup: dict[str, float] = field(default_factory=dict)  # graphhal / transformers tokens per second, acceptance


def expected_tokens_per_verify(acceptance: float, k: int) -> float:
    """Tokens a verify step yields per request when each draft survives with probability ``acceptance``."""
    return float(k + 1) if acceptance >= 1.0 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def run(
    device_name: str | None = None,
    batches: Sequence[int] | None = None,
    *,
    new_tokens: int = NEW_TOKENS,
    k_values: Sequence[int] = K_VALUES,
    acceptances: Sequence[float] = ACCEPTANCES,
    prompt_lookup: bool = True,
    timer: TimerSettings | None = None,
    dtype: torch.dtype | None = None,
) -> SpecBench:
    import transformers

    device = hal.get_device(device_name) if device_name else hal.best_available_device()
    on_cpu = device.type == "cpu"
    batches = list(batches or ([1, 4] if on_cpu else [1, 16, 64]))
    dtype = dtype or (torch.float32 if on_cpu else torch.bfloat16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(family_config("llama", tiny=on_cpu)).to(device.torch_device, dtype).eval()
    torch.manual_seed(1)
    draft_model = transformers.LlamaForCausalLM(family_config("llama", tiny=on_cpu, num_layers=DRAFT_LAYERS))
    draft_model = draft_model.to(device.torch_device, dtype).eval()
    result = SpecBench(str(device), dtype, f"llama {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}")
    max_bs, longest = max(batches), PROMPT_TOKENS + new_tokens + max(k_values) + 1
    with torch.inference_mode():
        setup = _Runners(model, draft_model, device, max_bs, longest, k_values)
        step_timer = StepTimer(device, timer or TimerSettings(budget_s=1.0 if on_cpu else 3.0))
        context = PROMPT_TOKENS + new_tokens // 2
        for batch in batches:
            result.steps.append(time_steps(step_timer, device, batch, context, setup.decode_and_cache, setup.verify, setup.draft))
        for batch, costs in zip(batches, result.steps):
            result.loops += _loop_rates(setup, costs, batch, new_tokens, k_values, acceptances, model.config.vocab_size, device)
        if prompt_lookup:
            result.lookup = _prompt_lookup(setup, model, device, new_tokens)
    return result


class _Runners:
    """The target's prefill, decode and verify runners (one per k) over one cache and pool, and the draft
    model's decode runner in that pool."""

    def __init__(self, model: Any, draft_model: Any, device: hal.Device, max_bs: int, longest: int, k_values: Sequence[int]) -> None:
        max_seq_len = -(-longest // BLOCK_SIZE) * BLOCK_SIZE
        blocks = max_bs * (max_seq_len // BLOCK_SIZE) + 8
        self.kv_cache = paged_kv_cache(model, num_blocks=blocks, block_size=BLOCK_SIZE, max_seq_len=max_seq_len)
        quiet = dict(mode="full", show_progress=False)
        self.prefill = prefill_runner(model, self.kv_cache, device, PrefillConfig(max_tokens=max_bs * PROMPT_TOKENS, max_requests=max_bs, **quiet))
        self.prefill.capture()
        pool = self.prefill.pool
        self.decode = decode_runner(model, self.kv_cache, device, DecodeConfig(max_bs=max_bs, **quiet), pool=pool)
        self.decode.capture()
        self.verify = {}
        for k in k_values:
            config = DecodeConfig(max_bs=max_bs, query_tokens=1 + k, **quiet)
            self.verify[k] = decode_runner(model, self.kv_cache, device, config, sampling=False, greedy_verify=True, pool=pool)
            self.verify[k].capture()
        self.draft_cache = paged_kv_cache(draft_model, num_blocks=blocks, block_size=BLOCK_SIZE, max_seq_len=max_seq_len)
        self.draft_decode = decode_runner(draft_model, self.draft_cache, device, DecodeConfig(max_bs=max_bs, **quiet), pool=pool)
        self.draft_decode.capture()

    @property
    def decode_and_cache(self) -> tuple[Any, Any]:
        return self.decode, self.kv_cache

    @property
    def draft(self) -> tuple[Any, Any]:
        return self.draft_decode, self.draft_cache

    def loop(self, **speculation: Any) -> GenerationLoop:
        return GenerationLoop(self.decode, self.prefill, self.kv_cache, eos_token_ids=None, **speculation)


def _prompts(batch: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 97 + 5 for j in range(PROMPT_TOKENS)] for i in range(batch)]


class _CountingDrafter:
    """A drafter as it is, noting which requests of a step have room for all ``k + 1`` tokens a verify step can
    yield (``max_new_tokens`` not reached inside the run): what those requests are handed in the step is their
    verify step's token count, untruncated."""

    def __init__(self, drafter: Any) -> None:
        self.drafter, self.eager_steps = drafter, 0
        self.with_room: list[Any] = []
        self.rows = 0  # requests the last step drafted for

    def propose(self, requests: Sequence[Any], num_draft_tokens: int) -> torch.Tensor:
        self.with_room = [r.request_id for r in requests if r.max_len - len(r.tokens) >= num_draft_tokens + 1]
        self.rows = len(requests)
        return self.drafter.propose(requests, num_draft_tokens)

    def release(self, request_id: Any) -> None:
        self.drafter.release(request_id)


def _timed(
    loop: GenerationLoop, prompts: list[list[int]], new_tokens: int, device: hal.Device, counting: _CountingDrafter | None = None
) -> tuple[float, dict[int, list[int]], list[int], float | None]:
    """Tokens per second of the loop's steps after its first (the prefill's), every request's tokens, (with
    ``counting``) the tokens each verify step with room for all of them handed a request, and the tokens per
    second over the steps where every request (all of ``prompts``) rode the verify step with that room.

    A loop with a drafter reads every step back before ``step`` returns, so a step's wall time is its own."""
    for index, prompt in enumerate(prompts):
        loop.add(index, prompt, new_tokens)
    outputs = dict(loop.step())
    device.synchronize()
    started, produced, per_verify = time.perf_counter(), 0, []
    full_s, full_tokens = 0.0, 0
    while not loop.idle:
        if counting is not None:
            counting.with_room, counting.rows = [], 0
        step_started = time.perf_counter()
        step = loop.step()
        step_s = time.perf_counter() - step_started
        step_tokens = sum(len(tokens) for tokens in step.tokens.values())
        produced += step_tokens
        outputs.update(step)
        if counting is not None:
            per_verify += [len(step.tokens.get(request_id, ())) for request_id in counting.with_room]
            if counting.rows == len(prompts) == len(counting.with_room):
                full_s, full_tokens = full_s + step_s, full_tokens + step_tokens
    device.synchronize()
    full_rate = full_tokens / full_s if full_s > 0 else None
    return produced / (time.perf_counter() - started), outputs, per_verify, full_rate


def _loop_rates(
    setup: _Runners, costs: StepCosts, batch: int, new_tokens: int, k_values: Sequence[int], acceptances: Sequence[float],
    vocab_size: int, device: hal.Device,
) -> list[LoopRate]:
    prompts = _prompts(batch)
    plain = setup.loop()
    plain.generate(prompts, 4)  # warm
    recorded = plain.generate(prompts, new_tokens + max(k_values))  # what the replay drafter proposes from
    rate, outputs, _, _ = _timed(plain, prompts, new_tokens, device)
    rates = [LoopRate(batch, 0, None, rate, same_tokens=all(outputs[i] == recorded[i][:new_tokens] for i in range(batch)))]
    continuations = {i: [*prompts[i], *recorded[i]] for i in range(batch)}
    for k in k_values:
        for acceptance in acceptances:
            drafter = _CountingDrafter(ReplayDrafter(continuations, acceptance, vocab_size, seed=k))
            loop = setup.loop(drafter=drafter, verify=setup.verify[k], num_draft_tokens=k)
            loop.generate(prompts, 4)  # warm
            rate, outputs, per_verify, full_rate = _timed(loop, prompts, new_tokens, device, drafter)
            rates.append(LoopRate(
                batch, k, acceptance, rate,
                tokens_per_verify=sum(per_verify) / len(per_verify) if per_verify else None,
                ideal_tokens_per_s=batch * expected_tokens_per_verify(acceptance, k) / costs.verify_ms[k] * 1e3,
                full_batch_tokens_per_s=full_rate,
                same_tokens=all(outputs[i] == recorded[i][:new_tokens] for i in range(batch)),
            ))
    return rates


def _prompt_lookup(setup: _Runners, model: Any, device: hal.Device, new_tokens: int) -> dict[str, float]:
    """Batch 1, a prompt of one 8-token phrase repeated: the loop with prompt lookup against transformers'."""
    k = LOOKUP_K if LOOKUP_K in setup.verify else max(setup.verify)
    prompt = [11, 23, 5, 42, 17, 8, 31, 64] * (PROMPT_TOKENS // 8)
    drafter = _CountingDrafter(PromptLookupDrafter())
    loop = setup.loop(drafter=drafter, verify=setup.verify[k], num_draft_tokens=k)
    loop.generate([prompt], 4)  # warm
    ours, _, per_verify, _ = _timed(loop, [prompt], new_tokens, device, drafter)
    acceptance = (sum(per_verify) / len(per_verify) - 1) / k if per_verify else 0.0  # drafts accepted of those proposed
    ids = torch.tensor([prompt], device=device.torch_device)
    options = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        prompt_lookup_num_tokens=k,
    )
    model.set_attn_implementation("sdpa")  # transformers' own attention and cache for its generate
    try:
        model.generate(ids, **options)  # warm
        device.synchronize()
        started = time.perf_counter()
        generated = model.generate(ids, **options)
        device.synchronize()
        theirs = (generated.shape[1] - ids.shape[1]) / (time.perf_counter() - started)
    finally:
        use_graphhal_attention(model, setup.kv_cache.config.max_seq_len)
    return {"k": k, "graphhal": ours, "transformers": theirs, "acceptance": acceptance}


def render(result: SpecBench) -> str:
    lines = [
        f"speculative decoding on {result.device} (torch {torch.__version__}, {str(result.dtype).removeprefix('torch.')}, "
        f"{result.model}; a {DRAFT_LAYERS}-layer draft model): {PROMPT_TOKENS}-token prompts",
        "",
        "step costs (ms; verify at q = 1 + k, its ratio to the plain decode step):",
    ]
    ks = sorted(result.steps[0].verify_ms) if result.steps else []
    lines.append(f"{'batch':>5}  {'decode':>8}  " + "  ".join(f"{f'verify k={k}':>17}" for k in ks) + f"  {'draft':>8}")
    for costs in result.steps:
        verify = "  ".join(f"{costs.verify_ms[k]:>9.3f} ({costs.verify_ratio(k):.2f}x)" for k in ks)
        draft = f"{costs.draft_ms:>8.3f}" if costs.draft_ms is not None else f"{'-':>8}"
        lines.append(f"{costs.batch:>5}  {costs.decode_ms:>8.3f}  {verify}  {draft}")
    lines += [
        "",
        "the loop with a replay drafter (tokens per second; k 0: the plain loop; full-batch: over the steps where every",
        "request verified with room for k + 1 tokens, as the ideal assumes; of ideal: full-batch over ideal):",
    ]
    lines.append(
        f"{'batch':>5}  {'k':>2}  {'a':>4}  {'tok/s':>9}  {'full-batch tok/s':>16}  {'tok/verify':>10}  {'ideal tok/s':>11}  "
        f"{'of ideal':>8}  {'same tokens':>11}"
    )
    for rate in result.loops:
        acceptance = f"{rate.acceptance:.1f}" if rate.acceptance is not None else "-"
        per_verify = f"{rate.tokens_per_verify:.2f}" if rate.tokens_per_verify is not None else "-"
        full = f"{rate.full_batch_tokens_per_s:.0f}" if rate.full_batch_tokens_per_s else "-"
        ideal = f"{rate.ideal_tokens_per_s:.0f}" if rate.ideal_tokens_per_s else "-"
        share = (
            f"{rate.full_batch_tokens_per_s / rate.ideal_tokens_per_s:.2f}x"
            if rate.ideal_tokens_per_s and rate.full_batch_tokens_per_s else "-"
        )
        same = {True: "yes", False: "NO", None: "-"}[rate.same_tokens]
        lines.append(
            f"{rate.batch:>5}  {rate.k:>2}  {acceptance:>4}  {rate.tokens_per_s:>9.0f}  {full:>16}  {per_verify:>10}  {ideal:>11}  "
            f"{share:>8}  {same:>11}"
        )
    if any(rate.same_tokens is False and rate.k > 0 for rate in result.loops) and result.dtype != torch.float32:
        lines.append(
            f"  same tokens NO: in {str(result.dtype).removeprefix('torch.')}, a verify step's matrix products (rows: batch x (1 + k)) "
            "round differently from the plain step's (rows: batch), so a near-tie between two logits of these random "
            "weights can go the other way; the request then continues on its own tokens, which the replay drafter "
            "(the plain run's continuation) no longer predicts. --dtype float32 checks the machinery at exact agreement."
        )
    if result.lookup:
        lookup = result.lookup
        lines += [
            "",
            f"prompt lookup at batch 1 (k = {lookup['k']:.0f}, a repetitive prompt; acceptance {lookup['acceptance']:.2f}): graphhal "
            f"{lookup['graphhal']:.0f} tok/s, transformers generate(prompt_lookup_num_tokens={lookup['k']:.0f}) "
            f"{lookup['transformers']:.0f} tok/s: {lookup['graphhal'] / lookup['transformers']:.2f}x",
        ]
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device")
    parser.add_argument("--batches", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = parser.parse_args()
    print(render(run(args.device, args.batches, new_tokens=args.new_tokens)))


if __name__ == "__main__":
    main()
