"""Benchmark: the reference decode step eager vs full graph vs breakable graph, and the cost of one break.

    python -m benchmarks.breakable_decode [--device cuda:0] [--batch-sizes 1,64]

Everything is measured in one run, on one device, as ratios against eager in that same run.
"""

from __future__ import annotations

import argparse

import torch

import hal
from graphhal_cli.step_timer import time_per_step
from refmodel import DecodeWorkload, LlamaDecoder, ModelConfig, PagedKVCache
from runners import DecodeConfig, DecodeRunner, InputSlot


def decode_step_times(device: hal.Device, batch_sizes: list[int], steps: int, repeats: int) -> None:
    dtype = torch.float32 if device.torch_device.type == "cpu" else torch.bfloat16
    config = ModelConfig()
    context_len = 512
    blocks_per_request = -(-(context_len + 1) // config.block_size)
    max_bs = max(batch_sizes)
    kv_cache = PagedKVCache(config, 1 + max_bs * blocks_per_request, device.torch_device, dtype)
    step = LlamaDecoder(config, device.torch_device, dtype, seed=0).decode_forward(kv_cache)
    workload = DecodeWorkload(kv_cache, max_bs, max_context_len=context_len, max_blocks_per_seq=blocks_per_request)
    runners = {}
    for mode in ("full", "breakable"):
        runners[mode] = DecodeRunner(step, workload.input_slots(), device, DecodeConfig(mode=mode, max_bs=max_bs, show_progress=False))
        print(runners[mode].capture().summary())
    print(f"reference decoder, {config.num_layers} layers, {str(dtype).removeprefix('torch.')}, contexts up to {context_len}")
    print(f"{'batch':>5}  {'eager ms':>9}  {'full ms':>9}  {'breakable ms':>12}  {'full x':>7}  {'breakable x':>11}")
    for batch_size in batch_sizes:
        batch = workload.batch(batch_size)
        eager = time_per_step(lambda: step(**batch), device, steps=steps, repeats=repeats)
        full = time_per_step(lambda: runners["full"].run(batch), device, steps=steps, repeats=repeats)
        breakable = time_per_step(lambda: runners["breakable"].run(batch), device, steps=steps, repeats=repeats)
        print(
            f"{batch_size:>5}  {eager * 1e3:>9.3f}  {full * 1e3:>9.3f}  {breakable * 1e3:>12.3f}  "
            f"{eager / full:>6.2f}x  {eager / breakable:>10.2f}x"
        )


def break_cost(device: hal.Device, breaks: int, steps: int, repeats: int) -> None:
    """Same tiny forward captured once without breaks and once with ``breaks`` forced cuts."""
    x = torch.zeros(1, 64, device=device.torch_device)

    def forward(*, x: torch.Tensor, cut: bool) -> torch.Tensor:
        for _ in range(breaks):
            x = x + 1
            if cut:
                hal.break_graph()
        return x

    times = {}
    for cut in (False, True):
        runner = DecodeRunner(
            lambda x, cut=cut: forward(x=x, cut=cut), [InputSlot("x", torch.float32, (64,))], device,
            DecodeConfig(mode="breakable", buckets=[1], show_progress=False),
        )
        runner.capture()
        times[cut] = time_per_step(lambda: runner.run({"x": x}), device, steps=steps, repeats=repeats)
    per_break = (times[True] - times[False]) / breaks
    print(
        f"one break: {per_break * 1e6:.1f} us  ({breaks} forced cuts: {times[True] * 1e6:.1f} us per step vs "
        f"{times[False] * 1e6:.1f} us with none, same {breaks} ops)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = hal.get_device(args.device) if args.device else hal.best_available_device()
    name = torch.cuda.get_device_name(device.torch_device) if device.torch_device.type == "cuda" else str(device)
    print(f"device {device} ({name}), torch {torch.__version__}; median of {args.repeats} repeats x {args.steps} steps")
    decode_step_times(device, sorted(int(b) for b in args.batch_sizes.split(",")), args.steps, args.repeats)
    break_cost(device, breaks=16, steps=args.steps, repeats=args.repeats)


if __name__ == "__main__":
    main()
