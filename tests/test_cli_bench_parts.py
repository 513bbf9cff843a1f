"""The pieces of ``graphhal bench`` on their own: the timer's stopping rule, output agreement, the ratios, and a
JSON file that strict parsers accept whatever the measurements were."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import hal
from graphhal.bench.agreement import max_abs_difference
from graphhal.bench.measurements import measured_apart
from graphhal.bench.plan import PrefillShape
from graphhal.bench.render.json_file import to_json, write_json
from graphhal.bench.render.table import render
from graphhal.bench.results import BenchResult, CaptureCost, CompiledSetup, Header, RestartSetup, Row, SetupCost, fill_ratios
from graphhal.bench.setup import compiled_setup, prefill_setup
from graphhal.bench.timing import StepTimer, TimerSettings, median_rel_error
from graphhal.bench.workload import build_reference_workload
from graphhal.refmodel import ModelConfig

pytestmark = pytest.mark.cpu


@pytest.fixture
def cpu() -> hal.Device:
    return hal.get_device("cpu")


class CountingStep:
    def __init__(self, sleeps: list[float] | None = None) -> None:
        self.calls = 0
        self.sleeps = sleeps or [0.0]

    def __call__(self) -> None:
        time.sleep(self.sleeps[self.calls % len(self.sleeps)])
        self.calls += 1


# --- timing -------------------------------------------------------------------------------------------------


def test_median_rel_error_is_the_robust_standard_error_of_the_median():
    assert median_rel_error([2.0, 2.0, 2.0]) == 0.0
    # median 2, MAD 1: sigma ~ 1.4826, standard error of the median ~ 1.2533 * sigma / sqrt(3)
    assert median_rel_error([1.0, 2.0, 3.0]) == pytest.approx(1.2533 * 1.4826 / math.sqrt(3) / 2)
    assert median_rel_error([1.0, 2.0, 3.0, 2.0, 1000.0]) < median_rel_error([1.0, 2.0, 3.0])  # outliers barely count
    assert median_rel_error([1.0]) == math.inf  # one sample says nothing about its spread


def test_timer_stops_at_min_repeats_once_the_median_is_stable(cpu):
    step = CountingStep()
    timing = StepTimer(cpu, TimerSettings(target_rel_error=1.0, min_repeats=4, steps_per_repeat=3, warmup_steps=2)).time(step)
    assert (timing.repeats, timing.steps_per_repeat) == (4, 3)
    assert step.calls == 2 + 4 * 3  # warm-up, then the samples; no calibration with fixed steps
    assert len(timing.samples_s) == 4 and timing.median_s >= 0


def test_timer_repeats_an_unstable_step_up_to_max_repeats(cpu):
    step = CountingStep(sleeps=[0.001, 0.002, 0.003, 0.004])  # spread over 1..4 ms: never within 1 %
    settings = TimerSettings(min_repeats=3, max_repeats=8, steps_per_repeat=1, warmup_steps=0, budget_s=60)
    timing = StepTimer(cpu, settings).time(step)
    assert timing.repeats == 8
    assert timing.rel_error > 0.01


def test_timer_stops_at_the_time_budget_with_min_repeats_done(cpu):
    step = CountingStep(sleeps=[0.001, 0.002, 0.003, 0.004])
    settings = TimerSettings(min_repeats=3, max_repeats=50, steps_per_repeat=1, warmup_steps=0, budget_s=0)
    assert StepTimer(cpu, settings).time(step).repeats == 3


def test_timer_picks_steps_per_repeat_so_a_sample_lasts_min_sample_s(cpu):
    step = CountingStep(sleeps=[0.002])
    settings = TimerSettings(target_rel_error=1.0, min_repeats=1, min_sample_s=0.02, warmup_steps=0)
    timing = StepTimer(cpu, settings).time(step)
    assert 4 <= timing.steps_per_repeat <= 10  # 20 ms of 2 ms steps (sleep overshoots, never undershoots)
    assert timing.median_s == pytest.approx(0.002, rel=1.0)


def test_steps_timed_together_take_their_samples_in_the_same_rounds(cpu):
    calls: list[str] = []
    steady = lambda: calls.append("steady")  # noqa: E731
    jittery = CountingStep(sleeps=[0.001, 0.002, 0.003, 0.004])

    def noisy() -> None:
        calls.append("noisy")
        jittery()

    settings = TimerSettings(min_repeats=3, max_repeats=6, steps_per_repeat=1, warmup_steps=0, budget_s=60)
    timings = StepTimer(cpu, settings).time_together({"steady": steady, "noisy": noisy})
    # The steady step is stable after 3 rounds but keeps sampling while the noisy one is not: both samples
    # come from the same stretch of time.
    assert timings["steady"].repeats == timings["noisy"].repeats == 6
    assert calls == ["steady", "noisy"] * 6


def test_a_step_that_raises_while_timed_together_is_dropped_and_the_others_are_timed(cpu):
    def broken() -> None:
        raise RuntimeError("replay failed")

    settings = TimerSettings(target_rel_error=1.0, min_repeats=3, steps_per_repeat=1, warmup_steps=1)
    timings = StepTimer(cpu, settings).time_together({"broken": broken, "fine": CountingStep()})
    assert isinstance(timings["broken"], RuntimeError)
    assert timings["fine"].repeats == 3
    with pytest.raises(RuntimeError, match="replay failed"):
        StepTimer(cpu, settings).time(broken)


def test_timer_settings_refuse_impossible_repeat_counts():
    with pytest.raises(ValueError, match="min_repeats"):
        TimerSettings(min_repeats=5, max_repeats=4)


# --- agreement ----------------------------------------------------------------------------------------------


def test_max_abs_difference_walks_nested_outputs_and_never_hides_a_nan():
    expected = {"logits": torch.zeros(2, 3), "extra": (torch.ones(2),)}
    got = {"logits": torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, -0.25]]), "extra": (torch.ones(2),)}
    assert max_abs_difference(got, expected) == 0.5
    got["extra"] = (torch.tensor([1.0, math.nan]),)
    assert math.isnan(max_abs_difference(got, expected))
    with pytest.raises(ValueError, match="shape"):
        max_abs_difference(torch.zeros(2), torch.zeros(3))


# --- results ------------------------------------------------------------------------------------------------


def _header() -> Header:
    return Header("cpu", "devices.cpu", torch.__version__, "float32", {}, 32, "perf_counter", {
        "target_rel_error": 0.01, "max_repeats": 50, "budget_s": 1.0,
    })


def test_ratios_compare_each_row_with_eager_and_the_floor_of_its_own_size():
    rows = [
        Row("decode", "eager", batch_size=1, median_ms=4.0),
        Row("decode", "floor", batch_size=1, median_ms=1.0),
        Row("decode", "full", batch_size=1, median_ms=2.0),
        Row("decode", "eager", batch_size=8, median_ms=8.0),
        Row("decode", "full", batch_size=8, median_ms=2.0),  # no floor at this size
    ]
    fill_ratios(rows)
    assert [r.speedup_vs_eager for r in rows] == [1.0, 4.0, 2.0, 1.0, 4.0]
    assert [r.ratio_to_floor for r in rows] == [4.0, 1.0, 2.0, None, None]


def test_json_turns_nan_and_infinity_into_null_so_strict_parsers_accept_it(tmp_path):
    result = BenchResult(_header())
    result.rows.append(Row("decode", "full", batch_size=1, median_ms=1.0, rel_error=math.inf, max_abs_diff=math.nan))
    result.capture_cost = CaptureCost(max_bs=4, num_buckets=3, capture_s=0.1, pool_bytes_all=300, pool_bytes_largest=0)
    path = tmp_path / "bench.json"
    write_json(result, path)
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert data["rows"][0]["rel_error"] is None and data["rows"][0]["max_abs_diff"] is None
    assert data["capture_cost"]["pool_ratio"] is None  # no largest-bucket pool to divide by
    assert data["capture_cost"]["break_cost_us"] is None


@pytest.mark.parametrize(
    ("breakable_ms", "shown"),
    [
        (1.0004, "one break: not measurable here (0.4 ± 0.7 us: the difference is within the timing noise)"),
        (0.9996, "one break: not measurable here (-0.4 ± 0.7 us: the difference is within the timing noise)"),
        (1.0100, "one break: 10.0 ± 0.7 us"),
    ],
)
def test_the_cost_of_a_break_is_shown_with_its_error_and_never_as_noise(breakable_ms, shown):
    # A negative cost, or one smaller than the noise of the two step times it is the difference of, is no cost.
    cost = CaptureCost(
        max_bs=4, num_buckets=3, capture_s=0.1, pool_bytes_all=2, pool_bytes_largest=2, breaks=1,
        full_bs1_ms=1.0, breakable_bs1_ms=breakable_ms, full_bs1_rel_error=0.0005, breakable_bs1_rel_error=0.0005,
    )
    result = BenchResult(_header())
    result.capture_cost = cost
    assert shown in render(result)


def test_table_shows_a_dash_where_a_value_does_not_apply():
    result = BenchResult(_header())
    result.rows.append(Row("prefill", "eager", tokens=64, requests=4, median_ms=1.5, repeats=5, steps_per_repeat=9, rel_error=0.004))
    text = render(result)
    line = next(line for line in text.splitlines() if line.lstrip().startswith("64"))
    assert line.split() == ["64", "4", "eager", "1.500", "-", "-", "-", "-", "-", "5x9", "±0.4%"]


def test_prefill_shapes_split_tokens_as_evenly_as_possible():
    assert PrefillShape(16, 4).query_lens() == [4, 4, 4, 4]
    assert PrefillShape(10, 4).query_lens() == [3, 3, 2, 2]
    assert sum(PrefillShape(1024, 3).query_lens()) == 1024


# --- setup cost ---------------------------------------------------------------------------------------------


def test_an_extrapolated_setup_scales_its_mean_per_size_to_every_bucket_and_says_so():
    measured = CompiledSetup("full+inductor", "", sizes=[4, 2, 1], num_buckets=3, setup_s=9.0, compiles=1)
    subset = CompiledSetup("reduce-overhead dynamic=False", "", sizes=[4, 1], num_buckets=3, setup_s=4.0, compiles=2)
    assert measured.extrapolated_s is None and measured.all_buckets_s == 9.0
    assert subset.extrapolated_s == subset.all_buckets_s == 6.0  # 2 s per size, 3 buckets
    cost = SetupCost(max_bs=4, decode=[measured, subset])
    assert cost.full_inductor_ratio(subset) == 1.5 and cost.full_inductor_ratio(measured) is None
    result = BenchResult(_header(), setup_cost=cost)
    text = render(result)
    assert "full+inductor setup / reduce-overhead dynamic=False: 1.50x (extrapolated)" in text
    assert "measured at sizes 4, 1 only: 2.00 s per size x 3 buckets = extrapolated" in text
    decode = to_json(result)["setup_cost"]["decode"]
    assert [(d["extrapolated_s"], d["full_inductor_ratio"]) for d in decode] == [(None, None), (6.0, 1.5)]


def test_the_dynamic_false_subset_keeps_the_sizes_a_server_runs_largest_first():
    assert compiled_setup.static_sizes([1, 8, 64, 256], 256) == [256, 64, 8, 1]
    assert compiled_setup.static_sizes([1, 8, 64, 256], 16) == [8, 1]
    assert compiled_setup.static_sizes([512], 256) == [256]  # nothing asked fits: the largest bucket
    assert len(compiled_setup.decode_buckets(256)) == 36


def test_compiled_setups_are_cuda_only_and_say_why_on_cpu(cpu):
    reasons = compiled_setup.skip_reasons(cpu)
    assert set(reasons) == set(compiled_setup.COMPILED_SETUPS)
    assert reasons["reduce-overhead"] == "n/a: reduce-overhead records CUDA graphs (CUDA only)"


def test_prefill_setup_caps_max_tokens_at_what_its_requests_can_hold():
    tiny = ModelConfig.tiny()  # max_seq_len 64, and PrefillConfig's 64 requests: 4096 tokens at most
    assert prefill_setup.setup_tokens(tiny, 4096) == (4096, "")
    tokens, note = prefill_setup.setup_tokens(tiny, 8192)
    assert tokens == 4096
    assert note == (
        "prefill setup: max_tokens capped at 4096 (asked 8192): 64 requests (PrefillConfig's max_requests) of at "
        "most max_seq_len 64 tokens hold no more"
    )
    assert prefill_setup.cache_shape(tiny, 100) == PrefillShape(100, 2)  # requests of at most 64 tokens


def test_one_compiled_step_serves_every_bucket_and_its_compiles_are_counted(cpu, monkeypatch):
    """``reduce_overhead`` with torch.compile's eager backend standing in for Inductor's cudagraph trees (CUDA
    only): one compiled object at every size, largest first. With the batch dim dynamic it compiles twice (a
    batch of 1 is specialised); with dynamic=False once per size, also past Dynamo's recompile limit of 8,
    where it would otherwise fall back to eager silently."""
    calls = []

    def setup_calls(compiled, static, torch_device):
        calls.append(next(iter(static.values())).shape[0])
        for _ in range(3):
            compiled(**static)

    monkeypatch.setattr(compiled_setup, "compile_reduce_overhead", lambda step, dynamic: torch.compile(
        step, backend="eager", dynamic=None if dynamic else False
    ))
    monkeypatch.setattr(compiled_setup, "reduce_overhead_setup_calls", setup_calls)
    monkeypatch.setattr(compiled_setup, "private_pool_bytes", lambda torch_device: 0)
    bench = build_reference_workload(cpu, ModelConfig.tiny(), torch.float32, max_batch_size=1, context_len=8)
    buckets = compiled_setup.decode_buckets(64)  # 12: 1, 2, 4, 8, 12, 16, 24, ..., 64
    with torch.no_grad():  # each measured apart, as a run measures them: nothing compiled before is reused
        with measured_apart(cpu):
            dynamic = compiled_setup.reduce_overhead(bench, buckets[::-1], len(buckets), False)
        with measured_apart(cpu):
            static = compiled_setup.reduce_overhead(bench, buckets[:10], len(buckets), False, dynamic=False)
    assert calls == [*buckets[::-1], *buckets[:10]]
    assert (dynamic.contender, dynamic.compiles, dynamic.extrapolated_s) == ("reduce-overhead", 2, None)
    assert (static.contender, static.compiles) == ("reduce-overhead dynamic=False", 10)
    assert static.extrapolated_s == pytest.approx(static.setup_s / 10 * len(buckets))


def test_a_restart_shows_what_its_stored_forward_alone_takes_and_what_graphhal_adds():
    restarts = [
        RestartSetup("full+inductor", 36, 12.0, 1.6, 20.0, 9.0, 1, 0, stored_forward_alone_s=1.1),
        RestartSetup("reduce-overhead", 36, 18.0, 5.0, 26.0, 12.0, 2, 2),
    ]
    result = BenchResult(_header(), setup_cost=SetupCost(restarts=restarts))
    text = render(result)
    assert "full+inductor warm restart: 1.60 s; its stored forward alone, loaded and called once" in text
    assert "no graph, 1.10 s" in text and "captures of every bucket, +0.50 s" in text
    assert "reduce-overhead warm restart" not in text  # only a stored compile has a floor to show
    restarts_json = to_json(result)["setup_cost"]["restarts"]
    assert [r["stored_forward_alone_s"] for r in restarts_json] == [1.1, None]


def test_a_restart_on_cpu_sets_up_every_bucket_in_two_fresh_processes():
    from graphhal.bench.setup.restart import measure_restart

    measured = measure_restart("full", "cpu", ModelConfig.tiny(), torch.float32, 4, 32)
    assert measured.num_buckets == 3  # 4, 2, 1
    assert 0 < measured.cold_setup_s < measured.cold_process_s and 0 < measured.warm_setup_s < measured.warm_process_s
    assert measured.cold_compiles == measured.warm_compiles == 0  # no compiler
    assert measured.stored_forward_alone_s is None  # nothing stored without full+inductor


def test_the_generation_bench_times_the_runners_step_and_every_loop_variant():
    pytest.importorskip("transformers")
    from graphhal.bench import generation

    rows = generation.run("cpu", [2], new_tokens=4)
    (row,) = rows
    assert row.batch == 2 and set(row.step_ms) == {"logits", "greedy", "sampled"}
    assert set(row.loop_ms_per_step) == {"sync greedy", "sync sampled", "overlap greedy", "overlap sampled"}
    assert all(value > 0 for value in [*row.step_ms.values(), *row.loop_ms_per_step.values(), *row.loop_tokens_per_s.values()])
    assert row.generate_tokens_per_s is None  # transformers' compiled generate: on a GPU only
    text = generation.render(rows, hal.get_device("cpu"), 4)
    assert "4 new tokens" in text and text.splitlines()[2].split()[0] == "2"
