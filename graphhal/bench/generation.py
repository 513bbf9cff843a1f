"""The generation loop's throughput: synchronous against overlapped, greedy against sampled, beside the runner's
own step (the floor of any loop) and transformers' ``generate`` (static cache and torch.compile, its fast path).

    python3 -m graphhal.bench.generation             # a 1B-shaped Llama in bfloat16 on a GPU; tiny on cpu
    graphhal bench --generation                      # the same

Per batch size (1, 16, 64 on a GPU), every request a 32-token prompt and 128 new tokens, it prints:

- ``step``: the decode runner's replay at that batch, timed alone (``torch.cuda.Event`` medians): logits only
  (``sampling=False``), greedy and sampled (temperature 0.8, top-k 50, top-p 0.95) through the sampler inside
  the graph; ``sampling +%`` is what the sampler adds to the logits-only step;
- ``loop``: the whole loop's time per decode step (prefill excluded: the loop's wall time after its prefill
  step, over the decode steps it queued; an overlapped loop's last step only reads back and is not one of
  them, so synchronous and overlapped divide by the same count) and its output tokens per second, synchronous and overlapped, greedy and
  sampled, and the overlapped loop's time per step over the runner's (the host's work, hidden when ~1.00x);
- ``generate``: transformers' ``generate`` with a static cache and ``torch.compile`` on the same weights,
  greedy, its output tokens per second (compiled once per batch size, not counted; at the first batch size
  only, unless asked: each compile takes tens of seconds).

Random weights: what is measured is the machinery, not what the model says.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

import hal
from graphhal.bench.transformers_families import family_config
from graphhal.sampling import SamplingParams, sampling_inputs
from graphhal.transformers import GenerationLoop, decode_runner, paged_kv_cache, prefill_runner
from runners import DecodeConfig, PrefillConfig

SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=0)
PROMPT_TOKENS = 32
NEW_TOKENS = 128


@dataclass
class GenerationRow:
    batch: int
    step_ms: dict[str, float] = field(default_factory=dict)  # logits, greedy, sampled
    loop_ms_per_step: dict[str, float] = field(default_factory=dict)  # "sync greedy", "overlap sampled", ...
    loop_tokens_per_s: dict[str, float] = field(default_factory=dict)
    generate_tokens_per_s: float | None = None

    @property
    def sampling_overhead(self) -> float | None:
        if "logits" not in self.step_ms or "sampled" not in self.step_ms:
            return None
        return self.step_ms["sampled"] / self.step_ms["logits"] - 1


def run(
    device_name: str | None = None, batches: list[int] | None = None, new_tokens: int = NEW_TOKENS, generate_batches: list[int] | None = None
) -> list[GenerationRow]:
    """``generate_batches``: the batch sizes transformers' generate is compiled and timed at (a compile each,
    tens of seconds for a 1B model); default the first batch size only, on a GPU (none on cpu)."""
    import transformers

    device = hal.get_device(device_name) if device_name else hal.best_available_device()
    on_cpu = device.type == "cpu"
    batches = batches or ([1, 4] if on_cpu else [1, 16, 64])
    dtype = torch.float32 if on_cpu else torch.bfloat16
    config = family_config("llama", tiny=on_cpu)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device.torch_device, dtype).eval()
    if generate_batches is None:
        generate_batches = [] if on_cpu else batches[:1]
    baseline = _transformers_generate_rates(model, device, generate_batches, new_tokens) if generate_batches else {}
    rows = []
    with torch.inference_mode():
        logits_only = _logits_runner(model, device, max(batches))
        loop = _loop(model, device, max(batches))
        for batch in batches:
            row = GenerationRow(batch)
            row.step_ms["logits"] = _step_ms(*logits_only, batch, device, sampled=None)
            row.step_ms["greedy"] = _step_ms(loop.decode, loop.kv_cache, batch, device, sampled=False)
            row.step_ms["sampled"] = _step_ms(loop.decode, loop.kv_cache, batch, device, sampled=True)
            for overlap in (False, True):
                for sampled in (False, True):
                    name = f"{'overlap' if overlap else 'sync'} {'sampled' if sampled else 'greedy'}"
                    ms, rate = _loop_rate(loop, batch, new_tokens, overlap=overlap, sampled=sampled, device=device)
                    row.loop_ms_per_step[name], row.loop_tokens_per_s[name] = ms, rate
            row.generate_tokens_per_s = baseline.get(batch)
            rows.append(row)
    return rows


_MAX_SEQ_LEN = PROMPT_TOKENS + NEW_TOKENS + 16  # what a request needs of the cache (rounded to blocks)


def _cache(model, max_bs: int):
    blocks_per_request = -(-_MAX_SEQ_LEN // 16)
    return paged_kv_cache(model, num_blocks=max_bs * blocks_per_request + 8, block_size=16, max_seq_len=_MAX_SEQ_LEN)


def _loop(model, device: hal.Device, max_bs: int) -> GenerationLoop:
    kv_cache = _cache(model, max_bs)
    config = PrefillConfig(mode="full", max_tokens=max_bs * PROMPT_TOKENS, max_requests=max_bs, show_progress=False)
    prefill = prefill_runner(model, kv_cache, device, config)
    prefill.capture()
    decode = decode_runner(model, kv_cache, device, DecodeConfig(mode="full", max_bs=max_bs, show_progress=False), pool=prefill.pool)
    decode.capture()
    return GenerationLoop(decode, prefill, kv_cache, eos_token_ids=None)


def _logits_runner(model, device: hal.Device, max_bs: int) -> tuple:
    """A decode runner that hands back the logits (no sampler in its graphs), and its cache."""
    kv_cache = _cache(model, max_bs)
    decode = decode_runner(model, kv_cache, device, DecodeConfig(mode="full", max_bs=max_bs, show_progress=False), sampling=False)
    decode.capture()
    return decode, kv_cache


def _step_ms(decode, kv_cache, batch: int, device: hal.Device, *, sampled: bool | None) -> float:
    """The decode runner's replay at ``batch`` requests (each with a short context), median of timed repeats."""
    rows = torch.arange(batch)
    blocks = torch.arange(1, batch + 1)
    dtypes = {slot.name: slot.dtype for slot in decode.slots}
    tables = torch.zeros(batch, kv_cache.config.max_blocks_per_seq, dtype=dtypes["block_tables"])
    tables[:, 0] = blocks
    inputs = {
        "input_ids": (rows % 100 + 5).to(dtypes["input_ids"]),
        "positions": torch.full((batch,), 8, dtype=dtypes["positions"]),
        "seq_lens": torch.full((batch,), 9, dtype=dtypes["seq_lens"]),
        "block_tables": tables,
        "slot_mapping": (blocks * kv_cache.block_size + 8).to(dtypes["slot_mapping"]),
    }
    if sampled is not None:
        params = [SAMPLED if sampled else SamplingParams.greedy()] * batch
        inputs.update(sampling_inputs(params, [0] * batch, "cpu"))
    batch_on_device = {name: tensor.to(device.torch_device) for name, tensor in inputs.items()}
    for _ in range(3):
        decode.run(batch_on_device)
    device.synchronize()
    times = []
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(10):
            decode.run(batch_on_device)
        device.synchronize()
        times.append((time.perf_counter() - started) / 10)
    return sorted(times)[len(times) // 2] * 1e3


def _loop_rate(loop: GenerationLoop, batch: int, new_tokens: int, *, overlap: bool, sampled: bool, device: hal.Device) -> tuple[float, float]:
    """The loop generating ``new_tokens`` for ``batch`` requests: ms per decode step, output tokens per second."""
    loop.overlap = overlap
    prompts = [[(7 * i + j) % 1000 + 5 for j in range(PROMPT_TOKENS)] for i in range(batch)]
    sampling = SAMPLED if sampled else SamplingParams.greedy()
    loop.generate(prompts, 4, sampling=sampling)  # warm: first steps, allocations
    for index, prompt in enumerate(prompts):
        loop.add(index, prompt, new_tokens, sampling=sampling)
    loop.step()  # the prefill step (and the first decode): not what is measured
    device.synchronize()
    with _counting_submits(loop.decode) as decode_steps:
        started = time.perf_counter()
        while not loop.idle:
            loop.step()
        device.synchronize()
        elapsed = time.perf_counter() - started
    return elapsed / max(decode_steps[0], 1) * 1e3, batch * (new_tokens - 1) / elapsed


@contextlib.contextmanager
def _counting_submits(runner) -> Iterator[list[int]]:
    """Counts the steps ``runner`` queues inside the block (``[count]``): the steps the loop actually ran,
    where counting ``loop.step()`` calls would count an overlapped loop's final read-back step too."""
    count = [0]
    submit = runner.submit

    def counted(*args, **kwargs):
        count[0] += 1
        return submit(*args, **kwargs)

    runner.submit = counted
    try:
        yield count
    finally:
        del runner.submit  # the class's method again


def _transformers_generate_rates(model, device: hal.Device, batches: list[int], new_tokens: int) -> dict[int, float]:
    """transformers' own generate, static cache and torch.compile, greedy: output tokens per second.

    With a static cache on a GPU, ``generate`` compiles the model's decode calls itself (``get_compiled_call``,
    mode ``reduce-overhead``: its CUDA graphs) and leaves the prefill eager: its fast path as shipped. Compiling
    ``model.forward`` here as well made the prefill a CUDA-graph replay too, whose outputs the first decode
    call overwrote (torch 2.11, transformers 5.17: "accessing tensor output of CUDAGraphs that has been
    overwritten"). A baseline that fails anyway is reported as missing with its reason, not the bench's end.
    """
    rates = {}
    model.set_attn_implementation("sdpa")
    model.generation_config.cache_implementation = "static"
    try:
        for batch in batches:
            ids = torch.full((batch, PROMPT_TOKENS), 5, dtype=torch.long, device=device.torch_device)
            options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            with torch.inference_mode():
                model.generate(ids, **options)  # compile and capture
                model.generate(ids, **options)
                device.synchronize()
                started = time.perf_counter()
                model.generate(ids, **options)
                device.synchronize()
            rates[batch] = batch * new_tokens / (time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - the baseline is a reference, not what the bench measures
        print(f"transformers' generate could not be timed: {type(error).__name__}: {str(error).splitlines()[0]}")
    finally:
        model.generation_config.cache_implementation = None
    return rates


def render(rows: list[GenerationRow], device: hal.Device, new_tokens: int = NEW_TOKENS) -> str:
    lines = [f"generation on {device} (torch {torch.__version__}): {PROMPT_TOKENS}-token prompts, {new_tokens} new tokens"]
    lines.append(
        f"{'batch':>5}  {'step logits':>11}  {'greedy':>7}  {'sampled':>7}  {'sampling +%':>11}  "
        f"{'sync greedy':>11}  {'overlap greedy':>14}  {'sync sampled':>12}  {'overlap sampled':>15}  "
        f"{'overlap / step':>14}  {'tok/s overlap':>13}  {'tok/s generate':>14}"
    )
    for row in rows:
        overhead = row.sampling_overhead
        ratio = row.loop_ms_per_step["overlap greedy"] / row.step_ms["greedy"]
        generate = f"{row.generate_tokens_per_s:.0f}" if row.generate_tokens_per_s else "-"
        lines.append(
            f"{row.batch:>5}  {row.step_ms['logits']:>11.3f}  {row.step_ms['greedy']:>7.3f}  {row.step_ms['sampled']:>7.3f}  "
            f"{(overhead or 0) * 100:>10.1f}%  {row.loop_ms_per_step['sync greedy']:>11.3f}  "
            f"{row.loop_ms_per_step['overlap greedy']:>14.3f}  {row.loop_ms_per_step['sync sampled']:>12.3f}  "
            f"{row.loop_ms_per_step['overlap sampled']:>15.3f}  {ratio:>13.2f}x  "
            f"{row.loop_tokens_per_s['overlap greedy']:>13.0f}  {generate:>14}"
        )
    lines.append("  step: the decode runner's replay (ms); loop: ms per decode step of the whole loop")
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device")
    parser.add_argument("--batches", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--generate-batches", type=lambda text: [int(part) for part in text.split(",") if part])
    args = parser.parse_args()
    device = hal.get_device(args.device) if args.device else hal.best_available_device()
    print(render(run(args.device, args.batches, args.new_tokens, args.generate_batches), device, args.new_tokens))


if __name__ == "__main__":
    main()
