"""What a careless or hostile caller gets from a runner: a clear error, never a silent wrong result.

Each test pins one way to misuse a runner (threads, moved tensors, inconsistent batches, grad, inference mode,
many compiles, bad arguments) and what graphhal does about it. Shared rules: the error names what was wrong
and what is allowed, and the runner stays usable afterwards.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import hal
from hal.capture_state import current_capture
from graphhal.paged_attention import PagedKVCache, decode_input_slots, prefill_attention_reference
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig, PrefillWorkload
from runners import DecodeConfig, DecodeRunner, InputSlot, PrefillConfig, PrefillRunner
from runners import RunnerThreadError

GRAPH_MODES = ["full", "breakable", "piecewise"]


class Reference:
    """The tiny reference model with a KV cache, on one device."""

    def __init__(self, device_name: str) -> None:
        self.device = hal.get_device(device_name)
        self.config = ModelConfig.tiny()
        self.model = LlamaDecoder(self.config, self.device.torch_device, torch.float32, seed=0)
        self.kv_cache = PagedKVCache(self.config, 96, self.device.torch_device, torch.float32)
        self.step = self.model.decode_forward(self.kv_cache)

    def decode_runner(self, mode: str = "full", watched=None, **config) -> DecodeRunner:
        config.setdefault("buckets", [1, 2, 4])
        runner = DecodeRunner(
            self.step,
            decode_input_slots(self.config),
            self.device,
            DecodeConfig(mode=mode, show_progress=False, **config),
            watched_tensors=watched,
        )
        runner.capture()
        return runner

    def workload(self, requests: int, seed: int) -> DecodeWorkload:
        return DecodeWorkload(self.kv_cache, requests, max_context_len=12, seed=seed)


def logits_of(runner: DecodeRunner, reference: Reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    graph = runner.run(batch).clone()
    with torch.no_grad():
        eager = reference.step(**batch)
    return graph, eager


# --- 1. threads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [*GRAPH_MODES, "disabled"])
def test_a_second_thread_running_a_runner_is_refused_and_the_owner_keeps_right_results(graph_device, mode):
    reference = Reference(graph_device)
    runner = reference.decode_runner(mode)
    workload = reference.workload(2, seed=1)
    batch = workload.batch(2)
    graph, eager = logits_of(runner, reference, batch)  # this thread now runs the runner
    torch.testing.assert_close(graph, eager)

    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            runner.run(batch)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            errors.append(exc)

    thread = threading.Thread(target=other_thread, name="intruder")
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], RunnerThreadError)
    assert "thread 'MainThread'" in str(errors[0]) and "'intruder' called run() too" in str(errors[0])
    graph, eager = logits_of(runner, reference, batch)  # still right, still this thread's
    torch.testing.assert_close(graph, eager)


def test_runners_sharing_a_pool_belong_to_one_thread_and_can_move_together(graph_device):
    reference = Reference(graph_device)
    first = reference.decode_runner()
    second = DecodeRunner(
        reference.step, decode_input_slots(reference.config), reference.device,
        DecodeConfig(buckets=[1, 2], show_progress=False), pool=first.pool,
    )
    second.capture()
    batch = reference.workload(1, seed=2).batch(1)
    first.run(batch)

    outcome: dict[str, object] = {}

    def server_loop_moves_here() -> None:
        try:
            second.run(batch)  # shares first's pool, so first's thread owns it too
        except RunnerThreadError as exc:
            outcome["refused"] = str(exc)
        second.claim_current_thread()  # the model loop moved: say so
        outcome["second"] = second.run(batch).clone()
        outcome["first"] = first.run(batch).clone()

    thread = threading.Thread(target=server_loop_moves_here)
    thread.start()
    thread.join()
    assert "claim_current_thread" in str(outcome["refused"])
    with torch.no_grad():
        expected = reference.step(**batch)
    torch.testing.assert_close(outcome["first"], expected)
    torch.testing.assert_close(outcome["second"], expected)
    with pytest.raises(RunnerThreadError):
        first.run(batch)  # the main thread gave them away


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_one_runner_per_thread_runs_concurrently_and_right(mode):
    results: dict[int, list[bool]] = {}

    def serve(index: int) -> None:
        reference = Reference("cpu")
        runner = reference.decode_runner(mode)
        checks = []
        for seed in range(6):
            workload = reference.workload(1 + seed % 4, seed=seed + 10 * index)
            graph, eager = logits_of(runner, reference, workload.batch(workload.num_requests))
            checks.append(torch.allclose(graph, eager, rtol=1e-4, atol=1e-4))
            workload.release()
        results[index] = checks

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: [True] * 6 for i in range(3)}


# --- 2. tensors moved after capture: checked before every replay -------------------------------------------


def _swap_a_weight(reference: Reference, runner: DecodeRunner) -> None:
    layer = reference.model.layers[0]
    layer.o_proj.data = layer.o_proj.data.clone()  # a weight reload done wrong


def _rebind_a_cache_layer(reference: Reference, runner: DecodeRunner) -> None:
    reference.kv_cache.key_caches[1] = reference.kv_cache.key_caches[1].clone()


def _replace_the_cache_list(reference: Reference, runner: DecodeRunner) -> None:
    reference.kv_cache.key_caches = list(reference.kv_cache.key_caches)


def _swap_a_submodule(reference: Reference, runner: DecodeRunner) -> None:
    reference.model.layers[1] = copy.deepcopy(reference.model.layers[1])


def _replace_a_runner_buffer(reference: Reference, runner: DecodeRunner) -> None:
    runner.inputs.rows.buffers["positions"] = runner.inputs.rows.buffers["positions"].clone()


@pytest.mark.parametrize(
    ("move", "message"),
    [
        (_swap_a_weight, r"watched 'model'\.layers\.0\.o_proj moved since the decode graph for bucket 2"),
        (_rebind_a_cache_layer, r"watched 'kv_cache'\.key_caches\[1\] moved"),
        (_replace_the_cache_list, r"watched 'kv_cache'\.key_caches moved"),
        (_swap_a_submodule, r"watched 'model'\.layers\.1 moved"),
        (_replace_a_runner_buffer, r"input slot 'positions' moved"),
    ],
)
def test_a_tensor_moved_after_its_bucket_was_checked_is_caught_on_the_next_replay(graph_device, move, message):
    reference = Reference(graph_device)
    runner = reference.decode_runner(watched={"model": reference.model, "kv_cache": reference.kv_cache})
    batch = reference.workload(2, seed=3).batch(2)
    runner.run(batch)
    runner.run(batch)  # bucket 2 has replayed twice: a first-replay check would never look again
    move(reference, runner)
    with pytest.raises(hal.StaticAddressError, match=message):
        runner.run(batch)


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_a_prefill_runner_checks_addresses_before_anything_runs(graph_device, mode):
    # Piecewise and breakable run prefill attention eagerly between their graphs, reading the server's tensors as
    # they are now: over a cache layer reallocated smaller it would index past its end. Checked first, nothing
    # runs and the error says what moved. (A full graph would read the old, freed memory: as bad, unseen.)
    reference = Reference(graph_device)
    workload = PrefillWorkload(reference.kv_cache, [3, 2], seed=1)
    runner = PrefillRunner(
        reference.model.prefill_forward(reference.kv_cache), workload.token_slots(), workload.request_slots(),
        reference.device, PrefillConfig(mode=mode, buckets=[8], max_requests=4, show_progress=False),
        watched_tensors={"kv_cache": reference.kv_cache},
    )
    runner.capture()
    batch = workload.batch()
    runner.run(batch)
    reference.kv_cache.key_caches[0] = torch.zeros_like(reference.kv_cache.key_caches[0][:1])  # one block left
    with pytest.raises(hal.StaticAddressError, match=r"watched 'kv_cache'\.key_caches\[0\] moved"):
        runner.run(batch)


def test_first_replay_policy_checks_each_bucket_once():
    reference = Reference("cpu")
    runner = reference.decode_runner(watched={"model": reference.model}, check_addresses="first_replay")
    batch = reference.workload(2, seed=7).batch(2)
    runner.run(batch)
    reference.model.lm_head.data = reference.model.lm_head.data.clone()
    runner.run(batch)  # bucket 2 was checked already: the policy the server chose does not look again
    with pytest.raises(hal.StaticAddressError, match=r"'model'\.lm_head moved since the decode graph for bucket 1"):
        runner.run({name: tensor[:1] for name, tensor in batch.items()})


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("watched", "message"),
    [
        ({"cache": 3}, r"watched_tensors\['cache'\] is a int; pass a tensor, an nn.Module"),
        ({"cache": None}, r"watched_tensors\['cache'\] is a NoneType; pass a tensor"),
        ({1: torch.zeros(1)}, r"watched_tensors keys must be names"),
    ],
)
def test_a_watched_value_that_can_hold_no_tensor_is_refused_naming_the_key(watched, message):
    reference = Reference("cpu")
    with pytest.raises(TypeError, match=message):
        DecodeRunner(reference.step, decode_input_slots(reference.config), "cpu", DecodeConfig(), watched_tensors=watched)


@pytest.mark.cpu
def test_a_watched_object_still_holding_no_tensor_at_capture_is_refused_and_the_runner_can_retry():
    reference = Reference("cpu")

    class LateCache:  # a server's cache manager, its tensors allocated once memory was profiled
        key_caches: list = []

    late = LateCache()
    late.key_caches = []
    runner = DecodeRunner(
        reference.step, decode_input_slots(reference.config), "cpu", DecodeConfig(buckets=[1, 2], show_progress=False),
        watched_tensors={"cache": late},
    )
    with pytest.raises(hal.CaptureError, match=r"watched_tensors\['cache'\] is a LateCache holding no tensor"):
        runner.capture()
    late.key_caches = list(reference.kv_cache.key_caches)  # allocated after the runner was built: watched now
    runner.capture()
    batch = reference.workload(1, seed=11).batch(1)
    runner.run(batch)
    late.key_caches[0] = late.key_caches[0].clone()
    with pytest.raises(hal.StaticAddressError, match=r"watched 'cache'\.key_caches\[0\] moved"):
        runner.run(batch)


def test_a_tensor_a_model_allocates_in_its_first_forward_is_watched_as_the_graphs_read_it(graph_device):
    device = hal.get_device(graph_device)

    class GrowsATableOnFirstUse(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.zeros(1, 4, device=device.torch_device)

        def forward(self, *, x):
            if self.table.shape[0] == 1:  # lazily sized on the first call, as rotary caches often are
                self.table = torch.ones(16, 4, device=device.torch_device)
            return x + self.table[: x.shape[0]]

    model = GrowsATableOnFirstUse()
    runner = DecodeRunner(
        model, [InputSlot("x", torch.float32, (4,))], device, DecodeConfig(buckets=[2, 4], show_progress=False),
        watched_tensors={"model": model},
    )
    runner.capture()
    x = torch.zeros(3, 4, device=device.torch_device)
    for _ in range(3):
        torch.testing.assert_close(runner.run({"x": x}), torch.ones(3, 4, device=device.torch_device))


def test_a_tensor_moved_between_two_buckets_captures_is_refused_at_capture(graph_device):
    device = hal.get_device(graph_device)
    state = {"weight": torch.ones(4, device=device.torch_device)}

    def forward(*, x):
        if x.shape[0] == 2 and current_capture() is None:
            state["weight"] = torch.ones(4, device=device.torch_device)  # rebound between captures
        return x * state["weight"]

    runner = DecodeRunner(
        forward, [InputSlot("x", torch.float32, (4,))], device, DecodeConfig(buckets=[2, 4], show_progress=False),
        watched_tensors={"weights": state},
    )
    with pytest.raises(hal.CaptureError, match=r"watched 'weights'\['weight'\] moved while the decode graphs were being captured.*before bucket 2"):
        runner.capture()


def test_a_runner_claimed_before_capture_shares_its_pools_thread_rule(graph_device):
    reference = Reference(graph_device)
    first = DecodeRunner(reference.step, decode_input_slots(reference.config), reference.device, DecodeConfig(buckets=[1], show_progress=False))
    first.claim_current_thread()  # before it has a pool
    first.capture()
    second = DecodeRunner(
        reference.step, decode_input_slots(reference.config), reference.device,
        DecodeConfig(buckets=[1], show_progress=False), pool=first.pool,
    )
    second.capture()
    refused = []
    thread = threading.Thread(target=lambda: refused.append(_raises_thread_error(second, reference)))
    thread.start()
    thread.join()
    assert refused == [True]  # second shares first's pool, which this thread owns


def _raises_thread_error(runner: DecodeRunner, reference: Reference) -> bool:
    try:
        runner.run(reference.workload(1, seed=12).batch(1))
    except RunnerThreadError:
        return True
    return False


# --- 3. inconsistent prefill batches ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "piecewise", "breakable", "disabled"])
def test_query_lens_adding_up_to_more_tokens_than_the_batch_holds_is_refused_on_the_host(graph_device, mode):
    reference = Reference(graph_device)
    workload = PrefillWorkload(reference.kv_cache, [3, 2], context_lens=[4, 0], seed=1)
    runner = PrefillRunner(
        reference.model.prefill_forward(reference.kv_cache),
        workload.token_slots(),
        workload.request_slots(),
        reference.device,
        PrefillConfig(mode=mode, buckets=[4, 8], max_requests=4, show_progress=False),
    )
    runner.capture()
    batch = workload.batch()
    inconsistent = dict(batch, query_lens=batch["query_lens"] + torch.tensor([1, 0], dtype=torch.int32))
    # The reference says so too; the model's own kernels read no length on the host, so the runner must.
    with pytest.raises(ValueError, match="query_lens add up to 6 tokens but the batch has only 5 rows"):
        prefill_attention_reference(
            torch.zeros(5, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(2, 8, dtype=torch.int32),
            inconsistent["query_lens"], torch.tensor([4, 2], dtype=torch.int32), 1.0,
        )
    with pytest.raises(ValueError, match=r"input slot 'query_lens' adds up to 6 tokens but the batch has only 5 token rows"):
        runner.run(inconsistent)
    negative = dict(batch, query_lens=torch.tensor([-1, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'query_lens' has a negative token count: \[-1, 6\]"):
        runner.run(negative)
    with torch.no_grad():
        torch.testing.assert_close(runner.run(batch), reference.model.prefill(**batch, kv_cache=reference.kv_cache), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_query_lens_on_the_device_is_refused_with_what_to_pass_instead():
    reference = Reference("cuda")
    workload = PrefillWorkload(reference.kv_cache, [3], seed=1)
    runner = PrefillRunner(
        reference.model.prefill_forward(reference.kv_cache), workload.token_slots(), workload.request_slots(),
        reference.device, PrefillConfig(mode="piecewise", buckets=[4], max_requests=2, show_progress=False),
    )
    runner.capture()
    batch = workload.batch()
    on_device = dict(batch, query_lens=batch["query_lens"].cuda())
    with pytest.raises(ValueError, match=r"'query_lens' \(role query_lens\) must be passed as a host \(CPU\) tensor"):
        runner.run(on_device)
    host = {name: tensor.cpu() for name, tensor in batch.items()}  # any slot may come from the host
    with torch.no_grad():
        torch.testing.assert_close(runner.run(host), runner.forward(**batch), rtol=1e-4, atol=1e-4)


# --- 4. shared output memory, modelled on the cpu --------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "breakable"])
def test_an_output_held_across_a_smaller_buckets_run_is_overwritten(graph_device, mode):
    def step(*, x):
        return torch.tanh(x) * 2 + 1

    runner = DecodeRunner(step, [InputSlot("x", torch.float32, (16,))], graph_device, DecodeConfig(mode=mode, buckets=[4, 8], show_progress=False))
    runner.capture()
    device = runner.device.torch_device
    held = runner.run({"x": torch.ones(8, 16, device=device)})
    before = held.clone()
    fresh = runner.run({"x": torch.zeros(3, 16, device=device)})
    torch.testing.assert_close(fresh, torch.ones(3, 16, device=device))
    # The buckets' outputs share pool memory (README: outputs are valid until the next run).
    assert not torch.equal(held, before)


# --- 5. inputs that require grad -------------------------------------------------------------------------


def test_an_input_that_requires_grad_is_refused_and_the_runner_stays_usable(graph_device):
    reference = Reference(graph_device)
    runner = DecodeRunner(
        lambda *, x: torch.relu(x) + 1, [InputSlot("x", torch.float32, (4,))], reference.device,
        DecodeConfig(buckets=[2], show_progress=False),
    )
    runner.capture()
    device = reference.device.torch_device
    for bad in (torch.ones(2, 4, device=device, requires_grad=True), torch.nn.Parameter(torch.ones(2, 4, device=device))):
        with pytest.raises(ValueError, match=r"input slot 'x': the tensor requires grad.*pass tensor.detach\(\)"):
            runner.run({"x": bad})
    torch.testing.assert_close(runner.run({"x": -torch.ones(2, 4, device=device)}), torch.ones(2, 4, device=device))


# --- 6. inference mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", GRAPH_MODES)
@pytest.mark.parametrize("capture_in, run_in", [("inference", "inference"), ("no_grad", "inference"), ("inference", "no_grad")])
def test_graphs_run_under_inference_mode_and_no_grad_alike(graph_device, mode, capture_in, run_in):
    torch._dynamo.reset()
    contexts = {"inference": torch.inference_mode, "no_grad": torch.no_grad}
    with contexts[capture_in]():
        reference = Reference(graph_device)
        runner = reference.decode_runner(mode)
        workloads = [reference.workload(n, seed=n) for n in (1, 2, 3)]
    for workload in workloads:
        batch = workload.batch(workload.num_requests)
        with contexts[run_in]():
            graph = runner.run(batch).clone()
        with contexts[capture_in]():
            eager = reference.step(**batch)
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


# --- 7. many compiles of one forward in a process --------------------------------------------------------


def test_any_number_of_piecewise_runners_of_one_forward_can_be_built():
    reference = Reference("cpu")
    batch = reference.workload(2, seed=8).batch(2)
    for _ in range(10):  # Dynamo's recompile limit is 8 per code object
        runner = reference.decode_runner("piecewise", buckets=[2])
        graph, eager = logits_of(runner, reference, batch)
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


_host_read_at_capture = {"on": True}


@torch.library.custom_op("graphhal_test::host_read_when_on", mutates_args=())
def host_read_when_on(x: torch.Tensor) -> torch.Tensor:
    """Reads a value on the host while switched on: fine eagerly, a failure inside a graph capture."""
    if _host_read_at_capture["on"]:
        x.sum().item()
    return x.clone()


@host_read_when_on.register_fake
def _(x):
    return torch.empty_like(x)


def fail_captures(runner: DecodeRunner, times: int) -> None:
    """Capture ``times`` times with the host read on: every capture fails (after compiling, in piecewise)."""
    _host_read_at_capture["on"] = True
    try:
        for _ in range(times):
            with pytest.raises(hal.CaptureError, match="reads a device value back to the host"):
                runner.capture()
    finally:
        _host_read_at_capture["on"] = False


def test_a_runner_can_retry_capture_any_number_of_times():
    reference = Reference("cpu")

    def flaky(**inputs):  # compiles fine; its capture fails while the host read is on
        return reference.step(**inputs) + torch.ops.graphhal_test.host_read_when_on(inputs["positions"])[:, None]

    runner = DecodeRunner(flaky, decode_input_slots(reference.config), "cpu", DecodeConfig(mode="piecewise", buckets=[2], show_progress=False))
    fail_captures(runner, 9)  # each retry compiles the forward again, then fails in the capture
    runner.capture()
    batch = reference.workload(2, seed=9).batch(2)
    torch.testing.assert_close(runner.run(batch), flaky(**batch), rtol=1e-4, atol=1e-4)


def test_resetting_torch_compile_after_a_piecewise_capture_says_what_happened():
    reference = Reference("cpu")
    runner = reference.decode_runner("piecewise", buckets=[2])
    batch = reference.workload(2, seed=10).batch(2)
    runner.run(batch)
    torch._dynamo.reset()
    with pytest.raises(hal.GraphHalError, match=r"dropped from torch.compile's cache.*torch._dynamo.reset\(\).*Capture again"):
        runner.run(batch)


@pytest.mark.parametrize("returned", [7, None, "logits"])
def test_a_piecewise_forward_returning_no_tensor_names_the_real_cause(returned):
    def step(*, x):
        return returned

    runner = DecodeRunner(step, [InputSlot("x", torch.float32, (4,))], "cpu", DecodeConfig(mode="piecewise", buckets=[2], show_progress=False))
    with pytest.raises(hal.CaptureError, match=r"the forward returned .*with no tensor computed from its inputs") as info:
        runner.capture()
    assert "recompile limit" not in str(info.value)


# --- 9. to 12. bad arguments -----------------------------------------------------------------------------


def test_disabled_mode_honours_eager_fallback_off(graph_device):
    runner = DecodeRunner(
        lambda *, x: x + 1, [InputSlot("x", torch.float32)], graph_device,
        DecodeConfig(mode="disabled", max_bs=4, eager_fallback=False, show_progress=False),
    )
    runner.capture()
    device = runner.device.torch_device
    with pytest.raises(ValueError, match=r"batch of 5 rows exceeds max_bs 4 and eager fallback is off"):
        runner.run({"x": torch.zeros(5, device=device)})
    torch.testing.assert_close(runner.run({"x": torch.zeros(4, device=device)}), torch.ones(4, device=device))


@pytest.mark.cpu
def test_an_empty_batch_can_run_only_with_a_consensus_group():
    # Without a consensus group run() refuses a batch of no rows; can_run must say so rather than True.
    runner = DecodeRunner(lambda *, x: x + 1, [InputSlot("x", torch.float32)], "cpu", DecodeConfig(buckets=[2], show_progress=False))
    runner.capture()
    empty = {"x": torch.zeros(0)}
    assert not runner.can_run(0) and runner.can_run(1) and runner.can_run(2) and not runner.can_run(3)
    with pytest.raises(ValueError, match="batch has no rows"):
        runner.can_run(empty)
    with pytest.raises(ValueError, match="batch has no rows"):
        runner.run(empty)
    with pytest.raises(ValueError, match="can_run takes a row count of at least 0, got -1"):
        runner.can_run(-1)


@pytest.mark.cpu
@pytest.mark.parametrize("batch", [None, [torch.zeros(2)], torch.zeros(2), "x"])
def test_a_batch_that_is_not_a_mapping_says_what_is_expected(batch):
    runner = DecodeRunner(lambda *, x: x + 1, [InputSlot("x", torch.float32)], "cpu", DecodeConfig(buckets=[2], show_progress=False))
    runner.capture()
    with pytest.raises(TypeError, match=r"run\(\) takes a mapping of slot name to tensor .*; this runner's slots: x"):
        runner.run(batch)
    with pytest.raises(TypeError, match=r"takes a mapping"):
        runner.can_run(batch)
    torch.testing.assert_close(runner.run({"x": torch.zeros(2)}), torch.ones(2))


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"breakable_debug": "off"}, r"decode: breakable_debug must be true or false, got 'off' \(str\)"),
        ({"eager_fallback": "false"}, r"decode: eager_fallback must be true or false, got 'false'"),
        ({"show_progress": "no"}, r"decode: show_progress must be true or false, got 'no'"),
        ({"eager_fallback": 0}, r"decode: eager_fallback must be true or false, got 0 \(int\)"),
        ({"warmup_runs": True}, r"decode: warmup_runs must be an integer, got True \(bool\)"),
        ({"buckets": 8}, r"decode: buckets must be a list of integers, got 8"),
        ({"buckets": [1, "2"]}, r"decode: buckets must be a list of integers, got \[1, '2'\]"),
        ({"max_bs": 2.5}, r"decode: max_bs must be an integer, got 2.5"),
        ({"mode": 1}, r"decode: mode must be a string, got 1"),
        ({"check_addresses": "never"}, r"decode: check_addresses must be one of every_replay, first_replay"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_naming_the_field(settings, message):
    from runners import GraphConfig

    with pytest.raises(ValueError, match=message):
        GraphConfig.from_dict({"decode": settings})
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**settings)


@pytest.mark.cpu
def test_json_booleans_are_read_as_booleans():
    from runners import GraphConfig

    config = GraphConfig.from_json('{"decode": {"eager_fallback": false, "breakable_debug": true}}')
    assert config.decode.eager_fallback is False and config.decode.breakable_debug is True


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("slot", "message"),
    [
        (lambda: InputSlot("lens", torch.int32, fill=10**10), r"input slot 'lens': fill 10000000000 does not fit torch.int32 \(allowed -2147483648..2147483647\)"),
        (lambda: InputSlot("ids", torch.int64, fill=0.5), r"input slot 'ids': fill for integer dtype torch.int64 must be an int, got 0.5"),
        (lambda: InputSlot("mask", torch.bool, fill=2), r"input slot 'mask': fill for a bool slot must be True or False"),
        (lambda: InputSlot("x", torch.float16, fill=1e6), r"input slot 'x': fill 1000000.0 overflows torch.float16"),
        (lambda: InputSlot("x", torch.float32, fill="0"), r"input slot 'x': fill must be a number"),
        (lambda: InputSlot("q", torch.int32, fill=1, role=hal.SlotRole.QUERY_LENS), r"'q': a query_lens slot .* pads with 0"),
    ],
)
def test_a_slot_fill_its_dtype_cannot_hold_is_refused_naming_the_slot(slot, message):
    with pytest.raises(ValueError, match=message):
        slot()


# --- memory: a failed or closed capture lets go of its graphs and pool ------------------------------------


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_a_failed_capture_and_a_closed_runner_let_go_of_their_pool(mode, monkeypatch):
    import gc
    import weakref

    reference = Reference("cpu")
    pools: list[weakref.ref] = []
    make_pool = reference.device.graph_pool
    def counted_pool():  # every pool a capture makes, watched without being kept alive
        pool = make_pool()
        pools.append(weakref.ref(pool))
        return pool

    monkeypatch.setattr(reference.device, "graph_pool", counted_pool)

    def flaky(**inputs):  # captures fail while the host read is on (in a piece, for piecewise)
        return reference.step(**inputs) + torch.ops.graphhal_test.host_read_when_on(inputs["positions"])[:, None]

    runner = DecodeRunner(flaky, decode_input_slots(reference.config), "cpu", DecodeConfig(mode=mode, buckets=[1, 2], show_progress=False))
    fail_captures(runner, 3)
    runner.capture()
    batch = reference.workload(2, seed=13).batch(2)
    torch.testing.assert_close(runner.run(batch), flaky(**batch), rtol=1e-4, atol=1e-4)
    runner.close()
    gc.collect()
    assert len(pools) == 4 and [pool() for pool in pools] == [None] * 4  # nothing holds a pool any more
    runner.capture()  # and the runner captures again
    torch.testing.assert_close(runner.run(batch), flaky(**batch), rtol=1e-4, atol=1e-4)
