"""Graph memory a server can budget: every bucket shares the pool the largest one captured, in every mode.

A small residual stack whose layers each cross an op that cannot be captured (declared ``never``): piecewise
splits there, breakable breaks there (its eager step returns a fresh tensor, the case that must be copied
into the pool), and the same stack over a capturable op is captured whole in mode full. For each mode: the
pool for all buckets against the largest bucket alone, the estimate made before the other buckets, the
budget, and every bucket still equal to eager after all are captured, replayed in random order.

The cpu reference device's pool places blocks as the CUDA caching allocator does, so what a held output sees
and what an estimate reads are the same on the cpu as on a GPU; the last tests pin that.
"""

from __future__ import annotations

import random

import pytest
import torch

import hal
from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner, InputSlot, PoolBudgetError, PrefillConfig, PrefillRunner

WIDTH = 256
BUCKETS = [8, 16, 32, 48, 64, 96, 128]


def _double(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2)


def _define(name: str, support: hal.GraphSupport) -> torch._ops.OpOverload:
    op = torch.library.custom_op(f"graphhal_test::{name}", mutates_args=("out",))(_double)
    op.register_fake(lambda x, out: None)
    overload = getattr(torch.ops.graphhal_test, name).default
    hal.declare_graph_support(overload, support)
    hal.register_splitting_op(overload)
    return overload


UNCAPTURABLE = _define("pool_sharing_never", hal.GraphSupport.NEVER)
CAPTURABLE = _define("pool_sharing_any", hal.GraphSupport.ANY_BATCH)


def _through(op: torch._ops.OpOverload):  # type: ignore[no-untyped-def]
    def step(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)  # a fresh tensor: in breakable mode the eager step's result
        op(x, out)
        return out

    return hal.break_point(step, name=f"pool sharing {op._schema.name}", required=False)


# Module globals, as a model's break points are (Dynamo in torch 2.11 does not look a callable object up among
# a module's instance attributes).
THROUGH_UNCAPTURABLE = _through(UNCAPTURABLE)
THROUGH_CAPTURABLE = _through(CAPTURABLE)


class Stack(torch.nn.Module):
    """Four layers of ``h = h + op(h @ w)``: the residual crosses every op, so a piece's output is read after
    the split and must stay where the next piece reads it."""

    def __init__(self, op: torch._ops.OpOverload, device: torch.device) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter((torch.randn(WIDTH, WIDTH, generator=generator) / WIDTH**0.5).to(device), requires_grad=False)
            for _ in range(4)
        )
        self.capturable = op is CAPTURABLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        through = THROUGH_CAPTURABLE if self.capturable else THROUGH_UNCAPTURABLE
        hidden = x
        for weight in self.weights:
            hidden = hidden + through(hidden @ weight)
        return hidden.relu()


MODES = [("full", CAPTURABLE), ("breakable", UNCAPTURABLE), ("piecewise", UNCAPTURABLE)]
SLOTS = [InputSlot("x", torch.float32, row_shape=(WIDTH,))]


def decode_runner(device: str, mode: str, op, buckets: list[int], **config) -> DecodeRunner:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    stack = Stack(op, hal.get_device(device).torch_device)
    return DecodeRunner(stack, SLOTS, device, DecodeConfig(mode=mode, buckets=buckets, show_progress=False, **config))


@pytest.mark.parametrize("mode, op", MODES, ids=[mode for mode, _ in MODES])
def test_every_bucket_shares_the_largest_ones_pool_and_still_equals_eager(graph_device, mode, op):
    alone = decode_runner(graph_device, mode, op, [BUCKETS[-1]])
    largest_alone = alone.capture().pool_bytes
    alone.close()

    runner = decode_runner(graph_device, mode, op, BUCKETS)
    estimate = runner.estimate_pool_bytes()  # the largest bucket captured, the others not yet
    assert len(runner.graphs) == 1
    report = runner.capture()
    assert largest_alone > 0
    assert report.pool_bytes <= 1.3 * largest_alone, (mode, report.pool_bytes, largest_alone)
    assert abs(report.pool_bytes - estimate) <= 0.1 * report.pool_bytes, (estimate, report.pool_bytes)
    assert report.estimate_bytes == estimate and sum(report.bucket_bytes().values()) == report.pool_bytes
    assert sorted(report.bucket_bytes()) == BUCKETS

    # Nothing alive in the pool that a later bucket needed: every bucket, in random order, equals eager.
    order = [rows for bucket in BUCKETS for rows in (bucket, bucket - 3)] * 2
    random.Random(0).shuffle(order)
    device = runner.device.torch_device
    for rows in order:
        x = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(rows)).to(device)
        with torch.no_grad():
            expected = runner.forward(x).clone()
        torch.testing.assert_close(runner.run({"x": x}), expected, rtol=1e-4, atol=1e-4)


def test_a_pool_over_budget_stops_the_capture_after_the_largest_bucket(graph_device):
    runner = decode_runner(graph_device, "breakable", UNCAPTURABLE, BUCKETS, pool_budget_mib=0.01)
    with pytest.raises(PoolBudgetError, match=r"decode: the graph pool for 7 buckets up to 128 would take about [\d.]+ MiB .*over pool_budget_mib 0.01\. Capture up to a smaller max_bs"):
        runner.capture()
    assert not runner.captured and runner.graphs == {}
    generous = decode_runner(graph_device, "breakable", UNCAPTURABLE, BUCKETS, pool_budget_mib=4096)
    generous.capture()
    assert generous.captured


@pytest.mark.cpu
def test_a_runner_stopped_by_its_budget_can_try_again_and_is_stopped_the_same_way():
    # What a server may do after the error: call capture() again (a retry loop, a second component). The
    # runner is left uncaptured and clean, so the second try gets the same budget error, not a state error.
    runner = decode_runner("cpu", "breakable", UNCAPTURABLE, BUCKETS, pool_budget_mib=0.01)
    for _ in range(2):
        with pytest.raises(PoolBudgetError, match="over pool_budget_mib 0.01"):
            runner.capture()
        assert not runner.captured and runner.graphs == {}
    with pytest.raises(PoolBudgetError):
        runner.estimate_pool_bytes()  # the estimate itself goes over: the same error, nothing kept


@pytest.mark.cpu
def test_the_budget_is_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="decode: pool_budget_mib must be positive"):
        DecodeConfig(pool_budget_mib=0)
    with pytest.raises(ValueError, match="prefill: pool_budget_mib must be a number, got '1G'"):
        PrefillConfig(pool_budget_mib="1G")


def test_decode_and_prefill_runners_sharing_one_pool_take_the_larger_plus_a_tenth(graph_device):
    device = hal.get_device(graph_device)
    decode = decode_runner(graph_device, "breakable", UNCAPTURABLE, BUCKETS)
    decode_alone = decode.capture().pool_bytes
    decode.close()

    stack = Stack(UNCAPTURABLE, device.torch_device)
    lens = [InputSlot("lens", torch.int32, role=hal.SlotRole.SEQ_LENS)]

    def prefill_step(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return stack(x)

    prefill_buckets = [16, 64, 256]
    prefill = PrefillRunner(prefill_step, SLOTS, lens, device, PrefillConfig(mode="piecewise", buckets=prefill_buckets, max_requests=2, show_progress=False))
    prefill_alone = prefill.capture().pool_bytes
    prefill.close()

    # The runner with the larger graphs first (prefill's 256 tokens against decode's 128 rows): a pool reuses
    # freed blocks for requests that fit them, so the smaller runner's captures then fit in the larger's memory.
    torch._dynamo.reset()
    shared = PrefillRunner(
        prefill_step, SLOTS, lens, device, PrefillConfig(mode="piecewise", buckets=prefill_buckets, max_requests=2, show_progress=False)
    )
    shared.capture()
    decode = DecodeRunner(
        Stack(UNCAPTURABLE, device.torch_device), SLOTS, device,
        DecodeConfig(mode="breakable", buckets=BUCKETS, show_progress=False), pool=shared.pool,
    )
    both = decode.capture().pool_bytes
    assert both <= 1.1 * max(decode_alone, prefill_alone), (both, decode_alone, prefill_alone)
    x = torch.randn(20, WIDTH).to(device.torch_device)
    with torch.no_grad():
        expected = stack(x).clone()
    torch.testing.assert_close(decode.run({"x": x}), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared.run({"x": x, "lens": torch.tensor([20], dtype=torch.int32)}), expected, rtol=1e-4, atol=1e-4)


@hal.break_point(name="reads host lengths")
def _scaled_by_host_lengths(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # What breakable mode is for: a host read. It returns a device tensor and a host one.
    total = int(lengths.sum())
    return x * total, torch.tensor([total, len(lengths)])


@pytest.mark.cuda
def test_host_tensors_crossing_a_break_stay_owned_while_device_ones_share_the_pool():
    # On a GPU the pool is device memory: a host tensor made during a segment (lengths) or returned by a break
    # is nobody else's, so the step must keep it; only device tensors become aliases.
    device = hal.get_device("cuda")

    def forward(x: torch.Tensor) -> torch.Tensor:
        lengths = torch.tensor([1, 2, 3])  # host lengths, built while a segment is being captured
        scaled, host = _scaled_by_host_lengths(x @ x.T, lengths)
        return scaled[:, :1] + host.sum().item()

    runner = DecodeRunner(forward, [InputSlot("x", torch.float32, row_shape=(8,))], device, DecodeConfig(mode="breakable", buckets=[2, 4, 8], show_progress=False))
    runner.capture()
    garbage = [torch.full((1000,), 7.0) for _ in range(200)]  # the host heap moves on
    for rows in (8, 3, 5, 1, 8):
        x = torch.randn(rows, 8, device=device.torch_device)
        torch.testing.assert_close(runner.run({"x": x}), forward(x))
    del garbage


def test_capture_goes_on_in_the_inference_mode_the_estimate_began_in(graph_device):
    # The estimate captures the largest bucket; capture() may be called under another inference mode, and
    # one compile and one set of graphs must still serve every bucket.
    runner = decode_runner(graph_device, "piecewise", UNCAPTURABLE, [8, 16, 32])
    with torch.inference_mode():
        runner.estimate_pool_bytes()
    runner.capture()
    x = torch.randn(5, WIDTH).to(runner.device.torch_device)
    with torch.no_grad():
        expected = runner.forward(x).clone()
    torch.testing.assert_close(runner.run({"x": x}), expected, rtol=1e-4, atol=1e-4)
    assert runner.estimate_pool_bytes() == sum(runner.report.added_bytes)  # after capture: what this runner added


# --- what the cpu reference device shows, as a GPU's pool does ---------------------------------------------


@pytest.mark.parametrize("mode, op", MODES, ids=[mode for mode, _ in MODES])
def test_an_older_buckets_output_held_across_a_smaller_buckets_run_is_overwritten(graph_device, mode, op):
    # Rows of 16 floats: at buckets 8 and 4 every tensor rounds up to one 512-byte block, so the smaller
    # bucket's capture, starting from the memory the larger one freed, lays its blocks where the larger's
    # were, in every mode: its output is the very memory of the held one (README: outputs are valid until the
    # next run).
    through = THROUGH_CAPTURABLE if op is CAPTURABLE else THROUGH_UNCAPTURABLE
    torch._dynamo.reset()
    runner = DecodeRunner(
        lambda *, x: through(x.tanh()) + 1, [InputSlot("x", torch.float32, row_shape=(16,))], graph_device,
        DecodeConfig(mode=mode, buckets=[4, 8], show_progress=False),
    )
    runner.capture()
    device = runner.device.torch_device
    held = runner.run({"x": torch.zeros(8, 16, device=device)})
    assert held.eq(1).all()
    smaller = runner.run({"x": torch.full((3, 16), 0.5, device=device)})
    assert smaller.data_ptr() == held.data_ptr()
    assert not held.eq(1).all()  # overwritten by bucket 4's run
    torch.testing.assert_close(held[:3], smaller)


def _reference_decode_runner(device: str, mode: str, buckets: list[int]) -> tuple[DecodeRunner, PagedKVCache]:
    torch._dynamo.reset()
    config = ModelConfig.tiny()
    torch_device = hal.get_device(device).torch_device
    model = LlamaDecoder(config, torch_device, torch.float32, seed=0)
    kv_cache = PagedKVCache(config, 96, torch_device, torch.float32)
    runner = DecodeRunner(
        model.decode_forward(kv_cache), decode_input_slots(config), device,
        DecodeConfig(mode=mode, buckets=buckets, show_progress=False),
    )
    return runner, kv_cache


@pytest.mark.parametrize("mode", [mode for mode, _ in MODES])
def test_identical_runners_estimate_the_same_pool(graph_device, mode):
    # A budget set from one start's estimate must admit the next start: the estimate depends on what the
    # forward allocates, not on where the host or the driver happened to put the pool's memory.
    estimates = []
    for _ in range(3):
        runner, _ = _reference_decode_runner(graph_device, mode, [1, 8, 64, 256])
        estimates.append(runner.estimate_pool_bytes())
        runner.close()
    assert estimates[0] > 0 and estimates == [estimates[0]] * 3, estimates


def _held_logits_overwritten_by_a_smaller_run(device: str, mode: str) -> bool:
    """Whether the reference model's bucket-8 logits, held across a run of bucket 4, were overwritten."""
    runner, kv_cache = _reference_decode_runner(device, mode, [4, 8])
    runner.capture()
    larger, smaller = DecodeWorkload(kv_cache, 8, max_context_len=12, seed=1), DecodeWorkload(kv_cache, 3, max_context_len=12, seed=2)
    held = runner.run(larger.batch(8))
    before = held.clone()
    runner.run(smaller.batch(3))
    overwritten = not torch.equal(held, before)
    runner.close()
    return overwritten


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [mode for mode, _ in MODES])
def test_a_held_output_fares_on_the_cpu_as_on_cuda(mode):
    # The reference device is only worth its tests if a held output fares on it as on a GPU. On an H100 the
    # reference model's logits were overwritten in full and piecewise and left alone in breakable (whose
    # break arguments stay allocated to the end of the capture, so its output sits above them), as here.
    # Offsets inside the segment can differ: a GPU also puts the temporaries a custom op allocates inside
    # its kernel into the pool, which the cpu recorder does not see.
    assert _held_logits_overwritten_by_a_smaller_run("cpu", mode) == _held_logits_overwritten_by_a_smaller_run("cuda", mode)
