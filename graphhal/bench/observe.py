"""``graphhal bench --observe``: what a server can see of its graphs, measured in one run.

- counters' cost: the batch-1 decode step (and the other batch sizes asked for) with ``runner.counting`` on
  against off, alternating blocks of steps in the same run on the same runner; the ratio is what keeping
  them on costs (target: at most 1 %);
- ``runner.stats()`` after those steps;
- device-wide memory per bucket beside the pool's share (the capture report), decode and prefill;
- the memory plan made on stand-in runners over a small KV cache, against the real capture, per phase;
- the prefill pool with every token's logits against the last token's only (``logits_rows``), at
  ``LOGITS_TOKENS`` tokens and a ``LOGITS_VOCAB`` vocabulary.

The model: the reference model (``ModelConfig.tiny()`` on the cpu, the default config elsewhere) in float32 on
the cpu, bfloat16 elsewhere.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import hal
from graphhal.paged_attention import PREFILL_ROW_OUTPUTS, PagedKVCache, decode_input_slots, prefill_request_slots, prefill_token_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig, PrefillWorkload
from runners import DecodeConfig, DecodeRunner, PrefillConfig, PrefillRunner
from runners.memory_plan import plan_graph_memory

LOGITS_TOKENS = 2048
LOGITS_VOCAB = 128256  # Llama 3's
# Alternating on/off blocks per batch size, and steps per block: (elsewhere, on the cpu) where a step takes
# tens of milliseconds and the figure says little (the cost that matters is against a GPU's short step).
BLOCKS_OF_STEPS = {False: 20, True: 4}
STEPS_PER_BLOCK = {False: 50, True: 5}


@dataclass
class ObserveResult:
    device: str
    counter_cost: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch -> (ms on, ms off)
    stats: dict[str, Any] = field(default_factory=dict)
    bucket_memory: dict[str, list[tuple[int, int, int | None]]] = field(default_factory=dict)  # phase -> (bucket, pool, device)
    plan: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (estimated, measured)
    logits_pool: tuple[int, int] = (0, 0)  # (every token's logits, last token's only)


def run(device_name: str, batch_sizes: Sequence[int] | None = None, *, logits_tokens: int = LOGITS_TOKENS) -> ObserveResult:
    device = hal.get_device(device_name)
    on_cpu = device.torch_device.type == "cpu"
    config = ModelConfig.tiny() if on_cpu else ModelConfig()
    dtype = torch.float32 if on_cpu else torch.bfloat16
    model = LlamaDecoder(config, device.torch_device, dtype)
    result = ObserveResult(str(device))
    sizes = list(batch_sizes or [1])
    max_bs = max(max(sizes), 8)

    def prefill_over(kv_cache: PagedKVCache) -> PrefillRunner:
        return PrefillRunner(
            model.prefill_forward(kv_cache), prefill_token_slots(), prefill_request_slots(config), device,
            PrefillConfig(max_tokens=64 if on_cpu else 1024, max_requests=4, show_progress=False),
        )

    def decode_over(kv_cache: PagedKVCache, pool: Any = None) -> DecodeRunner:
        config_ = DecodeConfig(max_bs=max_bs, show_progress=False)
        return DecodeRunner(model.decode_forward(kv_cache), decode_input_slots(config), device, config_, pool=pool)

    def cache(num_blocks: int) -> PagedKVCache:
        return PagedKVCache(config, num_blocks=num_blocks, device=device.torch_device, dtype=dtype)

    with torch.inference_mode():
        standin = cache(8)  # load, plan on a stand-in cache, size the real one (a quarter of what is left), capture
        plan = plan_graph_memory([prefill_over(standin), decode_over(standin)], share_pool=True)
        blocks = 4 * max_bs + 8 if on_cpu else max(plan.cache_bytes() // 4 // _block_bytes(config, dtype), 4 * max_bs + 8)
        kv_cache = cache(blocks)
        prefill = prefill_over(kv_cache)
        prefill_report = prefill.capture()
        decode = decode_over(kv_cache, pool=prefill.pool)
        decode_report = decode.capture()
        result.plan = plan.compare([prefill_report, decode_report])
        for report in (prefill_report, decode_report):
            result.bucket_memory[report.phase] = [
                (bucket, pool, report.bucket_device_bytes()[bucket]) for bucket, pool in report.bucket_bytes().items()
            ]
        workload = DecodeWorkload(kv_cache, max(sizes), max_context_len=min(32, config.max_seq_len // 2))
        for rows in sizes:
            result.counter_cost[rows] = _counter_cost(decode, workload, rows, device)
        result.stats = decode.stats()
        decode.close()
        prefill.close()
        result.logits_pool = _logits_pool(device, dtype, logits_tokens)
    return result


def _block_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.block_size * config.num_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8


def _counter_cost(runner: DecodeRunner, workload: DecodeWorkload, rows: int, device: hal.Device) -> tuple[float, float]:
    """Median ms per step with counting on and off, in alternating blocks on the same runner and batch."""
    batch = {name: tensor[:rows] for name, tensor in workload.batch().items()}
    on_cpu = device.torch_device.type == "cpu"
    steps = STEPS_PER_BLOCK[on_cpu]
    for _ in range(steps):  # warm
        runner.run(batch)
    times: dict[bool, list[float]] = {True: [], False: []}
    for block in range(2 * BLOCKS_OF_STEPS[on_cpu]):
        counting = block % 2 == 0
        runner.counting = counting
        device.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            runner.run(batch)
        device.synchronize()
        times[counting].append((time.perf_counter() - began) / steps * 1e3)
    runner.counting = True
    return statistics.median(times[True]), statistics.median(times[False])


def _logits_pool(device: hal.Device, dtype: torch.dtype, tokens: int) -> tuple[int, int]:
    """The prefill pool at ``tokens`` tokens and a ``LOGITS_VOCAB`` vocabulary: every token's logits, then the
    last token's of each of 4 requests. A model of one small layer, so the logits are what the pool holds."""
    config = ModelConfig(
        vocab_size=LOGITS_VOCAB, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=512, block_size=16, max_seq_len=tokens,
    )
    model = LlamaDecoder(config, device.torch_device, dtype)
    kv_cache = PagedKVCache(config, num_blocks=tokens // 16 + 8, device=device.torch_device, dtype=dtype)
    workload = PrefillWorkload(kv_cache, [tokens // 4] * 4)
    pools = []
    for rows in (False, True):
        runner = PrefillRunner(
            model.prefill_forward(kv_cache, logits_rows=rows), workload.token_slots(), workload.request_slots(logits_rows=rows),
            device, PrefillConfig(mode="full", buckets=[tokens], max_requests=4, show_progress=False),
            request_outputs=PREFILL_ROW_OUTPUTS if rows else (),
        )
        pools.append(runner.capture().pool_bytes)
        runner.close()
    return pools[0], pools[1]


def render(result: ObserveResult) -> str:
    mib = hal.MIB
    lines = [f"graphhal bench --observe on {result.device}", "", "counters' cost (decode, mode full; same runner, alternating blocks):"]
    for rows, (on, off) in result.counter_cost.items():
        lines.append(f"  batch {rows:>4}: counting on {on:.4f} ms, off {off:.4f} ms per step: on/off {on / off:.4f}")
    lines += ["", "device-wide memory per bucket beside the pool's share (MiB):"]
    for phase, rows in result.bucket_memory.items():
        cells = ", ".join(f"{b}: {d / mib:.2f} (pool {p / mib:.2f})" if d is not None else f"{b}: ? (pool {p / mib:.2f})" for b, p, d in rows)
        lines.append(f"  {phase}: {cells}")
    lines += ["", "memory plan on stand-ins (small KV cache) against the real capture, device-wide (MiB):"]
    for phase, (estimated, measured) in result.plan.items():
        error = (estimated - measured) / measured if measured else 0.0
        lines.append(f"  {phase:>7}: plan {estimated / mib:.2f}, measured {measured / mib:.2f} ({error:+.1%})")
    every, last = result.logits_pool
    lines += [
        "",
        f"prefill pool at {LOGITS_TOKENS if every else 0} tokens x {LOGITS_VOCAB} vocabulary: every token's logits "
        f"{every / mib:.1f} MiB, last token's only {last / mib:.1f} MiB ({every / last if last else 0:.1f}x smaller)",
        "",
        f"runner.stats() after the timed steps: {result.stats}",
    ]
    return "\n".join(lines)
