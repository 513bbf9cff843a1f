"""Why does a MoE model's first token differ with ``compiler="inductor"``? (issue 24)

    PYTHONPATH=. python scripts/diagnose_moe_inductor.py                 # cuda, tiny Mixtral, bfloat16
    PYTHONPATH=. python scripts/diagnose_moe_inductor.py --device cpu    # what the cpu can show (no full+inductor)
    PYTHONPATH=. python scripts/diagnose_moe_inductor.py --dtype float32 --family qwen3_moe

A tiny random model of the family (the tests' shape: tests/support/transformers_models.py) gets five prompts
that fit one prefill batch, and each way of computing their first tokens is compared with transformers' own
eager forward (what ``generate`` takes its first token from):

    eager        transformers' forward with its own attention, one prompt at a time
    disabled     graphhal's prefill step, run eagerly (mode disabled)
    full         the step captured as a device graph (cuda only)
    compiled     the step compiled by Inductor exactly as full+inductor compiles it, called without any graph
    full+ind     the compiled step captured as a device graph (cuda only)
    ...+emulate  the same with Inductor's emulate_precision_casts, which keeps eager's bf16/fp16 roundings

and it prints which experts implementation ran, which grouped matmul it took (torch's own, or transformers'
fallback that reads the expert offsets on the host), whether torch's grouped matmul synchronises the device
here, and graphhal's verdict for each runner it would build (``graphhal.transformers.experts``).

How to read it: if full+ind equals compiled, the graph replays what the compile computes, and a difference
from eager is the compile's numerics; if full+ind differs from compiled, the capture baked something in (a host
read of the routing). With emulate, compiled and full+ind should come back to eager.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformers  # noqa: E402
import transformers.integrations.moe as moe  # noqa: E402

from graphhal.transformers import GenerationLoop, UnsupportedModelError, decode_runner, paged_kv_cache, prefill_runner  # noqa: E402
from graphhal.transformers import experts  # noqa: E402
from graphhal.transformers.steps import PrefillStep  # noqa: E402
from hal.compile import CompiledForward, InductorBackend  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import build_model, prompts  # noqa: E402

PROMPT_LENGTHS = (1, 5, 12, 8, 3)  # 29 tokens: one prefill batch of the 32-token bucket
TOKEN_SLOTS = ("input_ids", "positions", "slot_mapping")  # what a prefill runner marks dynamic


# --- what ran ----------------------------------------------------------------------------------------------

ran: list[tuple[str, str]] = []


def _recorded(name: str, function: Any) -> Any:
    def experts_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append((f"experts {name}", _when()))
        return function(self, *args, **kwargs)

    return experts_forward


def _when() -> str:
    return "traced by torch.compile" if torch.compiler.is_compiling() else "eager"


def install_tracers() -> None:
    """Record, per call (or per trace: Dynamo replays the record on every call of the compiled code), which
    experts implementation ran and which grouped matmul ``grouped_mm`` took."""
    for name in ("grouped_mm", "batched_mm"):
        moe.ALL_EXPERTS_FUNCTIONS[name] = _recorded(name, moe.ALL_EXPERTS_FUNCTIONS[name])
    original = moe._grouped_mm

    def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if moe._can_use_grouped_mm(input, weight, offs):
            branch = "torch's grouped_mm"
        else:
            branch = "transformers' grouped_mm_fallback (offs.tolist() on the host)"
        ran.append((branch, _when()))
        return original(input, weight, offs)

    moe._grouped_mm = grouped_mm


@contextlib.contextmanager
def reporting(label: str) -> Iterator[None]:
    ran.clear()
    yield
    print(f"  {label:<28} ran: {', '.join(sorted({f'{what} ({when})' for what, when in ran})) or 'no experts call'}")


# --- first tokens ------------------------------------------------------------------------------------------


def eager_first(model: torch.nn.Module, texts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
    logits = []
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([text], device=model.device)
            logits.append(model(input_ids=ids, use_cache=False).logits[0, -1].float())
    stacked = torch.stack(logits)
    return stacked.argmax(-1).tolist(), stacked


def graphhal_first(
    model: torch.nn.Module, device: str, texts: list[list[int]], mode: str, compiler: str | None, *, emulate: bool = False,
    without_graph: bool = False,
) -> tuple[list[int], torch.Tensor] | str:
    """The first tokens graphhal's prefill gives ``texts`` (one packed batch), and their logits; or the refusal.
    ``without_graph``: the prefill step compiled as full+inductor compiles it, called directly on the batch."""
    torch._dynamo.reset()
    with torch.inference_mode(), torch._inductor.config.patch(emulate_precision_casts=emulate):
        kv_cache = paged_kv_cache(model, num_blocks=32, block_size=16, max_seq_len=128)
        try:
            prefill = prefill_runner(
                model, kv_cache, device,
                PrefillConfig(mode=mode, compiler=compiler, max_tokens=32, buckets=[32], max_requests=8, show_progress=False),
            )
        except UnsupportedModelError as refusal:
            return f"refused: {refusal}"
        prefill.capture()
        decode = decode_runner(model, kv_cache, device, DecodeConfig(mode="disabled", max_bs=8, show_progress=False))
        outputs: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        run = prefill.run
        compiled = CompiledForward(PrefillStep(model, kv_cache), InductorBackend(), TOKEN_SLOTS) if without_graph else None

        def recording_run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            if compiled is not None:
                logits = compiled(**{name: value.to(device) for name, value in batch.items()})
            else:
                logits = run(batch)
            outputs.append((batch, logits.float().clone()))
            return logits

        prefill.run = recording_run  # type: ignore[method-assign]
        GenerationLoop(decode, prefill, kv_cache).generate(texts, 1)
    (batch, logits), = outputs  # one prefill batch held every prompt
    last_rows = torch.cumsum(batch["query_lens"].long(), 0) - 1
    last = logits[last_rows.to(logits.device)]
    return last.argmax(-1).tolist(), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--family", default="mixtral", choices=["mixtral", "qwen2_moe", "qwen3_moe"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--experts", default=None, help="set the experts implementation first (grouped_mm, batched_mm, eager)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # Dynamo's notes on transformers' code
    dtype = getattr(torch, args.dtype)
    device = args.device

    print(f"torch {torch.__version__}, transformers {transformers.__version__}", end="")
    if device == "cuda":
        print(f", {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})", end="")
    print(f"; {args.family}, {args.dtype}")

    install_tracers()
    reference = build_model(args.family, device, dtype)
    model = build_model(args.family, device, dtype)
    for built in (reference, model):
        if args.experts:
            built.set_experts_implementation(args.experts)
    print(f"experts implementation: {experts.implementations(model)}")
    module = experts.experts_modules(model)[0]
    weight = module.gate_up_proj if module.has_gate else module.up_proj
    print(f"transformers' eager test _can_use_grouped_mm: {experts._torch_grouped_mm_usable(weight)}; under torch.compile "
          f"it takes {'torch' if dtype == torch.bfloat16 else 'its own fallback op'}'s grouped matmul for {args.dtype}")
    if device == "cuda":
        print(f"torch's grouped_mm synchronises the device here (offsets read on the host): {experts.grouped_mm_syncs(module, weight)}")

    texts = prompts(PROMPT_LENGTHS)
    print("\nwhat ran:")
    with reporting("eager (transformers)"):
        expected, expected_logits = eager_first(reference, texts)
    rows: dict[str, Any] = {"eager": (expected, expected_logits)}
    cases = [("disabled", "disabled", None, False, False)]
    if device == "cuda":
        cases.append(("full", "full", None, False, False))
    cases.append(("compiled, no graph", "disabled", None, False, True))
    if device == "cuda":
        cases.append(("full+inductor", "full", "inductor", False, False))
    cases.append(("compiled, no graph +emulate", "disabled", None, True, True))
    if device == "cuda":
        cases.append(("full+inductor +emulate", "full", "inductor", True, False))
    for label, mode, compiler, emulate, without_graph in cases:
        with reporting(label):
            rows[label] = graphhal_first(model, device, texts, mode, compiler, emulate=emulate, without_graph=without_graph)

    print(f"\nfirst tokens of {len(texts)} prompts (lengths {PROMPT_LENGTHS}); max |logit difference| over the vocabulary")
    print("from transformers' eager forward and from graphhal's eager step (mode disabled):")
    disabled_logits = rows["disabled"][1] if not isinstance(rows["disabled"], str) else None
    for label, result in rows.items():
        if isinstance(result, str):
            print(f"  {label:<28} {result}")
            continue
        tokens, logits = result
        from_eager = (logits - expected_logits).abs().max().item()
        from_disabled = float("nan") if disabled_logits is None else (logits - disabled_logits).abs().max().item()
        same = "= eager" if tokens == expected else "!= eager"
        print(f"  {label:<28} {tokens}  {same:<9} vs eager {from_eager:.4f}  vs disabled {from_disabled:.4f}")
    verdict(rows)


def verdict(rows: dict[str, Any]) -> None:
    def tokens(label: str) -> list[int] | None:
        result = rows.get(label)
        return None if result is None or isinstance(result, str) else result[0]

    eager, disabled = tokens("eager"), tokens("disabled")
    compiled, captured = tokens("compiled, no graph"), tokens("full+inductor")
    print("\nverdict:")
    if disabled != eager:
        print("  graphhal's eager step already differs from transformers' eager forward (its attention kernels round "
              "differently from transformers' in this dtype): compare the graph modes with 'disabled'.")
    if captured is not None and compiled is not None:
        if captured != compiled:
            print("  full+inductor differs from the same compile run without a graph: the capture baked something in "
                  "(a host read of the routing).")
        elif compiled != disabled:
            print("  full+inductor equals the compile without a graph: the graph replays what Inductor computes, and the "
                  "difference from the eager step is Inductor's numerics (fused roundings), which the routing's top-k "
                  "turns into another expert.")
        else:
            print("  full+inductor's first tokens equal the eager step's here.")
    elif compiled is not None:
        print(f"  the compiled step (no graph) {'equals' if compiled == disabled else 'differs from'} the eager step.")
    emulated = tokens("full+inductor +emulate") or tokens("compiled, no graph +emulate")
    if emulated is not None:
        print(f"  with emulate_precision_casts the compiled first tokens {'equal' if emulated == disabled else 'still differ from'} "
              "the eager step's.")


if __name__ == "__main__":
    main()
