"""Tensor and data parallel: graphs holding collectives, captured and replayed in lockstep by every rank.

Each test spawns its own ranks (``support.spawn_ranks``): two cpu processes over gloo in CI (the reference
device's graphs record and re-issue the collectives), two GPUs over NCCL on a machine that has them. Every
test is bounded: a rank that hangs is killed and the test fails naming it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hal
from hal.capture_state import current_capture
from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig, PrefillWorkload
from runners import DecodeConfig, DecodeRunner, InputSlot, PrefillConfig, PrefillRunner
from runners import RankCaptureError, RankRunError
from support.spawn_ranks import run_on_ranks

AGREEMENT_TIMEOUT_S = 30.0  # longer than the device group's (10 s): a rank stuck in a collective fails first

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.cpu, id="cpu-gloo"),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpus(2)], id="cuda-nccl"),
]


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _device(device_type: str, rank: int) -> hal.Device:
    return hal.get_device(f"cuda:{rank}" if device_type == "cuda" else "cpu")


class TwoModels:
    """On one rank: the TP=1 model and this rank's TP shard of the same seed, with caches holding the same
    context (the shard's cache holds this rank's KV heads of the full one)."""

    def __init__(self, device: hal.Device, rank: int, dtype: torch.dtype = torch.float32) -> None:
        self.device = device
        self.config = ModelConfig.tiny()
        torch_device = device.torch_device
        self.full = LlamaDecoder(self.config, torch_device, dtype, seed=0)
        self.full_cache = PagedKVCache(self.config, 128, torch_device, dtype)
        self.shard = LlamaDecoder(self.config, torch_device, dtype, seed=0, tp_group=dist.group.WORLD)
        self.cache = PagedKVCache(self.shard.local_config, 128, torch_device, dtype)
        self.heads = slice(rank * self.shard.local_config.num_kv_heads, (rank + 1) * self.shard.local_config.num_kv_heads)

    def share_context(self) -> None:
        """Copy this rank's KV heads of the full cache into the shard's cache."""
        for full, mine in zip(self.full_cache.key_caches + self.full_cache.value_caches, self.cache.key_caches + self.cache.value_caches):
            mine.copy_(full[:, :, self.heads])

    def decode_runner(self, mode: str, buckets: list[int], consensus_group=None, **config) -> DecodeRunner:
        runner = DecodeRunner(
            self.shard.decode_forward(self.cache), decode_input_slots(self.config), self.device,
            DecodeConfig(mode=mode, buckets=buckets, show_progress=False, agreement_timeout_s=AGREEMENT_TIMEOUT_S, **config),
            group=dist.group.WORLD, consensus_group=consensus_group,
        )
        runner.capture()
        return runner


# --- the bodies each rank runs (module level: spawned processes import them) --------------------------------


def tp_equals_single_process(rank: int, world_size: int, device_type: str) -> dict[str, float]:
    models = TwoModels(_device(device_type, rank), rank)
    differences = {}
    with torch.no_grad():
        decode = DecodeWorkload(models.full_cache, 6, max_context_len=20, seed=1)
        models.share_context()
        batch = decode.batch()
        differences["decode"] = (models.shard.decode_forward(models.cache)(**batch) - models.full.decode_forward(models.full_cache)(**batch)).abs().max().item()
        prefill = PrefillWorkload(models.full_cache, [5, 3, 7], context_lens=[4, 0, 9], seed=2)
        models.share_context()
        batch = prefill.batch()
        tp_logits = models.shard.prefill(**batch, kv_cache=models.cache)
        differences["prefill"] = (tp_logits - models.full.prefill(**batch, kv_cache=models.full_cache)).abs().max().item()
    return differences


def graphs_equal_eager_under_tp(
    rank: int, world_size: int, device_type: str, decode_modes: list[tuple[str, str | None]],
    prefill_modes: tuple[tuple[str, str | None], ...] = (("piecewise", None), ("breakable", None)),
) -> dict[str, float]:
    models = TwoModels(_device(device_type, rank), rank)
    step = models.shard.decode_forward(models.cache)
    workload = DecodeWorkload(models.cache, 8, max_context_len=20, seed=3)
    differences = {}
    for mode, compiler in decode_modes:
        torch._dynamo.reset()
        runner = models.decode_runner(mode, [1, 2, 4, 8], **({"compiler": compiler} if compiler else {}))
        worst = 0.0
        for rows in (1, 3, 8, 2):
            batch = workload.batch(rows)
            graph = runner.run(batch).clone()
            with torch.no_grad():
                worst = max(worst, (graph - step(**batch)).abs().max().item())
        differences[f"decode {mode}{'+' + compiler if compiler else ''}"] = worst
    for mode, compiler in prefill_modes:
        torch._dynamo.reset()
        probe = PrefillWorkload(models.cache, [1])
        runner = PrefillRunner(
            models.shard.prefill_forward(models.cache), probe.token_slots(), probe.request_slots(), models.device,
            PrefillConfig(
                mode=mode, buckets=[8, 16], max_requests=4, show_progress=False, agreement_timeout_s=AGREEMENT_TIMEOUT_S,
                **({"compiler": compiler} if compiler else {}),
            ),
            group=dist.group.WORLD,
        )
        probe.release()
        runner.capture()
        worst = 0.0
        for query_lens in ([5, 2], [3, 4, 6], [16]):
            prefill = PrefillWorkload(models.cache, query_lens, seed=len(query_lens))
            batch = prefill.batch()
            graph = runner.run(batch).clone()
            with torch.no_grad():
                worst = max(worst, (graph - models.shard.prefill(**batch, kv_cache=models.cache)).abs().max().item())
            prefill.release()
        differences[f"prefill {mode}{'+' + compiler if compiler else ''}"] = worst
    return differences


def ranks_capturing_differently(rank: int, world_size: int, device_type: str, field: str) -> str:
    """Rank 1 differs from rank 0 in ``field``: buckets, mode (it would run eagerly), or whether it agrees on
    every run (a consensus group that rank 0 lacks: at the first run one rank would wait for the other)."""
    models = TwoModels(_device(device_type, rank), rank)
    mode, buckets, consensus = "full", [1, 2, 4], None
    if rank == 1:
        if field == "mode":
            mode = "disabled"
        elif field == "buckets":
            buckets = [1, 2, 8]
        else:
            consensus = dist.group.WORLD
    try:
        models.decode_runner(mode, buckets, consensus_group=consensus)
    except RankCaptureError as error:
        assert error.rank == 1 and error.bucket is None
        return str(error)
    raise AssertionError("the ranks went different ways without an error")


def a_rank_whose_capture_raises(rank: int, world_size: int, device_type: str) -> str:
    models = TwoModels(_device(device_type, rank), rank)
    step = models.shard.decode_forward(models.cache)

    def forward(**inputs):
        logits = step(**inputs)  # every collective of the step first: the peer is not left waiting in one
        if rank == 1 and current_capture() is not None and inputs["input_ids"].shape[0] == 2:
            raise RuntimeError("out of graph memory on rank 1")
        return logits

    runner = DecodeRunner(
        forward, decode_input_slots(models.config), models.device,
        DecodeConfig(mode="full", buckets=[1, 2, 4], show_progress=False, agreement_timeout_s=AGREEMENT_TIMEOUT_S),
        group=dist.group.WORLD,
    )
    try:
        runner.capture()
    except RankCaptureError as error:
        assert error.rank == 1 and error.bucket == 2 and not runner.captured
        return str(error)
    raise AssertionError("capture succeeded although rank 1 failed")


@torch.library.custom_op("graphhal_test::fails_on_rank_1_capturing_bucket_2", mutates_args=())
def fails_on_rank_1_capturing_bucket_2(x: torch.Tensor) -> torch.Tensor:
    """An op that breaks on rank 1 while bucket 2 is captured (an out-of-memory, say), in any graph mode."""
    if dist.get_rank() == 1 and current_capture() is not None and x.shape[0] == 2:
        raise RuntimeError("out of graph memory on rank 1")
    return x.clone()


@fails_on_rank_1_capturing_bucket_2.register_fake
def _(x):
    return torch.empty_like(x)


def a_rank_failing_between_collectives(rank: int, world_size: int, device_type: str, mode: str) -> tuple[int | None, int | None, str]:
    """Rank 1 fails between two all-reduces while capturing bucket 2: rank 0 waits in the second one until
    the device group's timeout (a capture on the cpu device runs its collectives), then both agree."""
    from graphhal.refmodel.tensor_parallel import TensorParallel

    device = _device(device_type, rank)
    tp = TensorParallel.of(dist.group.WORLD)

    def forward(*, x):
        partial = tp.all_reduce(x * 2)
        partial = torch.ops.graphhal_test.fails_on_rank_1_capturing_bucket_2(partial)
        return tp.all_reduce(partial + 1)

    runner = DecodeRunner(
        forward, [InputSlot("x", torch.float32, (4,))], device,
        DecodeConfig(mode=mode, buckets=[1, 2, 4], show_progress=False, agreement_timeout_s=AGREEMENT_TIMEOUT_S),
        group=dist.group.WORLD,
    )
    try:
        runner.capture()
    except RankCaptureError as error:
        assert not runner.captured
        return error.rank, error.bucket, str(error)
    raise AssertionError("capture succeeded although rank 1 failed")


def a_data_parallel_rank_refusing_its_batch(rank: int, world_size: int, device_type: str) -> list[str]:
    """Rank 1 passes a batch of the wrong dtype at step 0: both ranks raise there, and later steps are right."""
    device = _device(device_type, rank)
    group = dist.group.WORLD

    def forward(*, x):
        total = x * 0 + 1
        dist.all_reduce(total, group=group)
        return x * 2 + total

    runner = DecodeRunner(
        forward, [InputSlot("x", torch.float32, (4,))], device,
        DecodeConfig(buckets=[2, 4], show_progress=False, agreement_timeout_s=AGREEMENT_TIMEOUT_S),
        group=group, consensus_group=group,
    )
    runner.capture()
    outcomes = []
    for step in range(3):
        x = torch.full((3, 4), float(step), device=device.torch_device)
        if step == 0 and rank == 1:
            x = x.double()
        try:
            out = runner.run({"x": x})
            torch.testing.assert_close(out, x * 2 + world_size)
            outcomes.append("ok")
        except RankRunError as error:
            outcomes.append(str(error))
    return outcomes


def an_empty_batch_on_a_tensor_parallel_rank(rank: int, world_size: int, device_type: str) -> str:
    models = TwoModels(_device(device_type, rank), rank)
    runner = models.decode_runner("full", [1, 2])
    batch = DecodeWorkload(models.cache, 2, max_context_len=8, seed=4).batch(2)
    if rank == 1:
        batch = {name: tensor[:0] for name, tensor in batch.items()}
    runner.run(batch)
    models.device.synchronize()  # where a graph waiting on a collective of its peer would surface
    return "ran"


def data_parallel_ranks_agree_on_each_step(rank: int, world_size: int, device_type: str) -> list[tuple[int, int, bool]]:
    """A forward with a collective over the data-parallel group on a [rows, 4] tensor: it only completes when
    every rank runs the same bucket, and it records which (bucket, graph or eager) ran."""
    device = _device(device_type, rank)
    group = dist.group.WORLD
    seen: list[tuple[int, bool]] = []

    def forward(*, x):
        seen.append((x.shape[0], current_capture() is not None))
        total = x * 0 + 1
        dist.all_reduce(total, group=group)  # = world_size everywhere, only if the shapes match
        return x * 2 + total

    runner = DecodeRunner(
        forward, [InputSlot("x", torch.float32, (4,))], device,
        DecodeConfig(buckets=[2, 4, 8], show_progress=False, agreement_timeout_s=AGREEMENT_TIMEOUT_S),
        group=group, consensus_group=group,
    )
    runner.capture()
    sizes = {0: [3, 1, 5, 9], 1: [0, 6, 1, 2]}[rank]  # rank 1 idles first; rank 0's 9 rows exceed max_bs
    outcomes = []
    for rows in sizes:
        x = torch.arange(rows * 4, dtype=torch.float32, device=device.torch_device).reshape(rows, 4)
        seen.clear()
        out = runner.run({"x": x})
        assert out.shape == (rows, 4)
        torch.testing.assert_close(out, x * 2 + world_size)
        device.synchronize()
        outcomes.append((rows, *(seen[-1] if seen else (-1, False))))  # eager steps call forward; replays do not
    return outcomes


# --- the tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_type", DEVICES)
def test_tp2_logits_equal_tp1_logits_of_the_same_weights(device_type):
    # float32. On GPUs cuBLAS picks other kernels (split-K, tiles) for the halved shapes than for the full
    # ones, so the sums differ in order: a looser bound there.
    tolerance = 1e-5 if device_type == "cpu" else 1e-4
    for differences in run_on_ranks(tp_equals_single_process, device_type, backend=_backend(device_type)):
        assert differences["decode"] < tolerance and differences["prefill"] < tolerance, differences


def _named(phase: str, modes: list[tuple[str, str | None]]) -> set[str]:
    return {f"{phase} {mode}{'+' + compiler if compiler else ''}" for mode, compiler in modes}


@pytest.mark.parametrize("device_type", DEVICES)
def test_every_mode_under_tp2_equals_eager(device_type):
    modes = [("full", None), ("breakable", None), ("piecewise", None)]
    prefill_modes = [("piecewise", None), ("breakable", None)]
    if device_type == "cuda":  # the cpu device cannot record Inductor's C++ kernels (UnsupportedModeError)
        modes += [("full", "inductor"), ("breakable", "inductor"), ("piecewise", "inductor")]
        prefill_modes += [("piecewise", "inductor"), ("breakable", "inductor")]
    results = run_on_ranks(graphs_equal_eager_under_tp, device_type, modes, prefill_modes, backend=_backend(device_type), timeout_s=300)
    for differences in results:
        assert set(differences) == _named("decode", modes) | _named("prefill", prefill_modes)
        # float32; Inductor's fused kernels reorder reductions, so compiled modes get a looser bound.
        assert all(value < (1e-3 if "inductor" in name else 1e-4) for name, value in differences.items()), differences


@pytest.mark.parametrize("device_type", DEVICES)
@pytest.mark.parametrize(
    ("field", "difference"),
    [
        ("buckets", "rank 1 has buckets [1, 2, 8] where rank 0 has [1, 2, 4]"),
        ("mode", "rank 1 has mode 'disabled' where rank 0 has 'full'"),
        ("consensus_group", "rank 1 has agreement on every run (consensus_group) True where rank 0 has False"),
    ],
)
def test_ranks_about_to_capture_differently_fail_on_every_rank_naming_the_rank_and_field(device_type, field, difference):
    for message in run_on_ranks(ranks_capturing_differently, device_type, field, backend=_backend(device_type)):
        assert difference in message


@pytest.mark.parametrize("device_type", DEVICES)
def test_a_rank_whose_capture_raises_fails_capture_on_every_rank_naming_it(device_type):
    for rank, message in enumerate(run_on_ranks(a_rank_whose_capture_raises, device_type, backend=_backend(device_type))):
        assert f"(this is rank {rank})" in message
        assert "rank 1 failed at the capture of bucket 2: CaptureError" in message and "out of graph memory on rank 1" in message


def each_runner_waits_its_own_agreement_timeout(rank: int, world_size: int) -> float | None:
    """Two runners on one group: the first waits 600 s at an agreement, the second 2 s. Rank 1 builds the
    second but never captures it: rank 0 must give up after about 2 s, not 600."""
    import time

    device = hal.get_device("cpu")
    slots = [InputSlot("x", torch.float32, (4,))]

    def runner(timeout_s: float) -> DecodeRunner:
        config = DecodeConfig(mode="full", buckets=[1, 2], show_progress=False, agreement_timeout_s=timeout_s)
        return DecodeRunner(lambda x: x * 2, slots, device, config, group=dist.group.WORLD)

    patient, impatient = runner(600.0), runner(2.0)
    patient.capture()
    if rank == 1:
        time.sleep(8.0)  # stays away from the agreement, then leaves
        return None
    started = time.perf_counter()
    with pytest.raises(RankCaptureError, match=r"within 2 s"):
        impatient.capture()
    return time.perf_counter() - started


@pytest.mark.cpu
def test_each_runner_on_a_process_group_waits_its_own_agreement_timeout():
    waited, _ = run_on_ranks(each_runner_waits_its_own_agreement_timeout, timeout_s=60)
    assert waited < 6.0, f"rank 0 waited {waited:.1f} s for a peer with a 2 s agreement timeout"


@pytest.mark.cpu
def test_an_empty_batch_on_a_tensor_parallel_rank_ends_both_ranks_with_an_error_in_bounded_time():
    (status0, error0), (status1, error1) = run_on_ranks(an_empty_batch_on_a_tensor_parallel_rank, "cpu", expect_errors=True)
    assert status1 == "error" and "batch has no rows" in error1 and "consensus_group" in error1
    # Rank 0's replay waits in the all-reduce rank 1 never joins until gloo gives up on it: at the process
    # group's timeout, or when rank 1 leaves first. (On CUDA nothing times out a collective inside a graph:
    # see docs/parallel.md.) Either way the error comes from that collective, not from graphhal.
    first_line = error0.splitlines()[0].lower()
    assert status0 == "error" and "gloo" in first_line and ("timed out" in first_line or "connection closed" in first_line)


@pytest.mark.parametrize("device_type", DEVICES)
def test_data_parallel_ranks_pad_to_the_largest_batch_and_go_graph_or_eager_together(device_type):
    rank0, rank1 = run_on_ranks(data_parallel_ranks_agree_on_each_step, device_type, backend=_backend(device_type))
    # Step 1: 3 rows and an idle rank both replay bucket 4; step 2: 1 and 6 -> bucket 8; step 3: 5 and 1 -> 8.
    assert [rows for rows, _, _ in rank0] == [3, 1, 5, 9] and [rows for rows, _, _ in rank1] == [0, 6, 1, 2]
    assert [step[1] for step in rank0[:3]] == [-1, -1, -1] == [step[1] for step in rank1[:3]]  # replays: no eager call
    # Step 4: rank 0's 9 rows exceed max_bs 8, so both run eagerly, padded alike to 9 rows for the collective.
    assert rank0[3] == (9, 9, False) and rank1[3] == (2, 9, False)


@pytest.mark.parametrize("device_type", DEVICES)
@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_a_rank_failing_between_collectives_fails_capture_on_every_rank_naming_it(device_type, mode):
    results = run_on_ranks(a_rank_failing_between_collectives, device_type, mode, backend=_backend(device_type))
    for rank, (culprit, bucket, message) in enumerate(results):
        assert (culprit, bucket) == (1, 2), message  # the same rank and bucket on every rank
        assert "out of graph memory on rank 1" in message and f"(this is rank {rank})" in message


@pytest.mark.parametrize("device_type", DEVICES)
def test_a_data_parallel_rank_refusing_its_batch_stops_that_step_on_every_rank_and_the_next_ones_run(device_type):
    for outcomes in run_on_ranks(a_data_parallel_rank_refusing_its_batch, device_type, backend=_backend(device_type)):
        assert "the step failed on rank(s) 1 of the consensus group" in outcomes[0]
        assert "dtype torch.float64, expected torch.float32" in outcomes[0]
        assert outcomes[1:] == ["ok", "ok"]
