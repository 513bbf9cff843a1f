"""``graphhal demo``: capture the reference decoder on the best device present and compare it with eager.

It does what a server does at startup and per step: build the model and its paged KV cache, hand the
decode step to a ``DecodeRunner``, capture, then run live batches. It prints the capture summary, eager vs
graph time per decode step, and the largest difference between the graph's and eager logits.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from graphhal.bench.device_description import describe_device
from graphhal.bench.plan import MODELS
from graphhal.bench.timing import StepTimer, TimerSettings
from graphhal.cli.shared_options import DTYPES, chosen_device
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder
from runners import DecodeConfig, DecodeRunner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="device name (cuda:0, cpu, ...); default: the best one present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on accelerators, float32 on cpu")
    parser.add_argument("--batch-sizes", default="1,64", help="live batch sizes to time, comma-separated")
    parser.add_argument("--max-bs", type=int, help="largest captured batch; default: the largest batch size timed")
    parser.add_argument("--context-len", type=int, default=512, help="longest cached context per request")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="default",
        help="reference model size (small: heads of 128 dims, what Ascend's fused attention takes); default: default",
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: the model's own)")
    parser.add_argument("--steps", type=int, help="steps per timing repeat (default: 50 on accelerators, 5 on cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; the median is reported")


def run(args: argparse.Namespace) -> int:
    device = chosen_device(args.device)
    on_cpu = device.type == "cpu"  # the device, not where its tensors live (a simulator keeps npu ones on the CPU)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if on_cpu else torch.bfloat16)
    batch_sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
    max_bs = args.max_bs or batch_sizes[-1]
    steps = args.steps or (5 if on_cpu else 50)

    config = MODELS[args.model]()
    if args.layers is not None:
        config = dataclasses.replace(config, num_layers=args.layers)
    blocks_per_request = -(-(args.context_len + 1) // config.block_size)
    kv_cache = PagedKVCache(config, 1 + max(batch_sizes) * blocks_per_request, device.torch_device, dtype)
    model = LlamaDecoder(config, device.torch_device, dtype, seed=0)
    workload = DecodeWorkload(
        kv_cache, max(batch_sizes), max_context_len=args.context_len, max_blocks_per_seq=blocks_per_request,
        conventions=device.conventions,  # the role inputs in the dtypes the device's kernels take (npu: int32)
    )
    step = model.decode_forward(kv_cache)

    print(
        f"graphhal demo: reference decoder ({config.num_layers} layers, hidden {config.hidden_size}, "
        f"{str(dtype).removeprefix('torch.')}) on {device} ({describe_device(device)}), torch {torch.__version__}"
    )
    runner = DecodeRunner(step, workload.input_slots(), device, DecodeConfig(max_bs=max_bs))
    print(runner.capture().summary())

    # Fixed steps and repeats: the demo is a quick look; `graphhal bench` repeats until the median is stable.
    timer = StepTimer(device, TimerSettings(steps_per_repeat=steps, min_repeats=args.repeats, max_repeats=args.repeats))
    print(f"{'batch':>5}  {'eager ms/step':>13}  {'graph ms/step':>13}  {'speedup':>7}  {'max |graph - eager|':>19}")
    for batch_size in batch_sizes:
        batch = workload.batch(batch_size)
        with torch.no_grad():
            eager_logits = step(**batch).float()
        graph_logits = runner.run(batch).float()
        difference = (graph_logits - eager_logits).abs().max().item()
        with torch.no_grad():
            eager = timer.time(lambda: runner.forward(**batch)).median_s
        graph = timer.time(lambda: runner.run(batch)).median_s
        note = "" if runner.can_run(batch) else "  (over max_bs: ran eagerly)"
        print(f"{batch_size:>5}  {eager * 1e3:>13.3f}  {graph * 1e3:>13.3f}  {eager / graph:>6.2f}x  {difference:>19.3g}{note}")
    print(f"(median of {args.repeats} repeats of {steps} steps each)")
    if on_cpu:
        print(
            "note: the cpu device is graphhal's reference device; its graphs re-issue recorded ops for "
            "faithful semantics, not speed. Run on a GPU for real speedups."
        )
    return 0

