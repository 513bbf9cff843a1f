"""A stored compile: a restarted process loads Dynamo's and Inductor's output and traces nothing, and never
loads one traced from something else (another model, other inputs, other source).

Real processes and a real Inductor compile (on CPU here: the runner's use of it, capturing the loaded forward
into CUDA graphs, is tested on cuda below).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import hal.compile
from hal.compile import stored_compile
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig

needs_aot_compile = pytest.mark.skipif(not stored_compile.available(), reason="this torch has no aot_compile")

# One process: the tiny reference decoder's decode step, compiled with a store, called at three sizes.
_DECODE_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    import hal.compile
    from torch._dynamo.utils import counters
    from graphhal.paged_attention import PagedKVCache
    from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig

    config = ModelConfig.tiny()
    model = LlamaDecoder(config, torch.device("cpu"), torch.float32, seed=int(sys.argv[2]))
    kv_cache = PagedKVCache(config, 64, torch.device("cpu"), torch.float32)
    workload = DecodeWorkload(kv_cache, 8, max_context_len=20, max_blocks_per_seq=8, seed=4)
    step = model.decode_forward(kv_cache)
    backend = hal.compile.InductorBackend()
    names = [slot.name for slot in workload.input_slots()]
    forward = hal.compile.CompiledForward(step, backend, names, store=hal.compile.CompileStore(sys.argv[1]))
    differences = []
    with torch.no_grad():
        for rows in (8, 3, 1):  # the first call compiles (or loads) at the largest, as runners do
            batch = workload.batch(rows)
            differences.append((forward(**batch) - step(**batch)).abs().max().item())
    print(json.dumps({"loaded": forward.loaded, "compiles": backend.compile_count,
                      "traced": counters["stats"]["unique_graphs"], "differences": differences}))
    """
)


def _run(script: str, *arguments: str, cwd: Path | None = None) -> dict:
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(arguments[0]) / "inductor")}
    if cwd is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(cwd), environment.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=900, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.cpu
@needs_aot_compile
def test_a_restarted_process_loads_the_stored_compile_and_traces_nothing(tmp_path):
    cold = _run(_DECODE_PROCESS, str(tmp_path), "0")
    assert not cold["loaded"] and cold["compiles"] == 1 and cold["traced"] == 1
    assert len(list(tmp_path.glob("forward-*.bin"))) == 1
    warm = _run(_DECODE_PROCESS, str(tmp_path), "1")  # other weights: the stored code reads them, bakes none
    assert warm["loaded"] and warm["compiles"] == 0 and warm["traced"] == 0  # Dynamo traced nothing
    for difference in cold["differences"] + warm["differences"]:  # every size equals eager
        assert difference < 1e-4


# A model in a module of its own, whose source the test changes between two processes.
_SCALED_MODEL = "import torch\n\nFACTOR = {factor}\n\n\ndef scaled(x):\n    return torch.relu(x) * FACTOR + 1\n"
_SCALED_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    import hal.compile
    from scaled_model import scaled

    backend = hal.compile.InductorBackend()
    forward = hal.compile.CompiledForward(scaled, backend, ["x"], store=hal.compile.CompileStore(sys.argv[1]))
    x = torch.randn(6, 4)
    difference = (forward(x=x) - scaled(x)).abs().max().item()
    print(json.dumps({"loaded": forward.loaded, "compiles": backend.compile_count, "difference": difference}))
    """
)


@pytest.mark.cpu
@needs_aot_compile
def test_a_compile_stored_from_other_source_is_compiled_again(tmp_path):
    """Here a module-level constant, which the function reads and the graph bakes in, changes."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "scaled_model.py").write_text(_SCALED_MODEL.format(factor=2))
    first = _run(_SCALED_PROCESS, str(tmp_path), cwd=code)
    assert not first["loaded"] and first["difference"] == 0
    assert _run(_SCALED_PROCESS, str(tmp_path), cwd=code)["loaded"]  # same source: loaded
    (code / "scaled_model.py").write_text(_SCALED_MODEL.format(factor=3))  # the function the same, a constant not
    changed = _run(_SCALED_PROCESS, str(tmp_path), cwd=code)
    assert not changed["loaded"] and changed["compiles"] == 1 and changed["difference"] == 0  # the new code runs
    assert _run(_SCALED_PROCESS, str(tmp_path), cwd=code)["loaded"]  # and was stored over the old


def _decode_step(config: ModelConfig, num_blocks: int = 64) -> tuple[object, DecodeWorkload]:
    model = LlamaDecoder(config, torch.device("cpu"), torch.float32, seed=0)
    kv_cache = PagedKVCache(config, num_blocks, torch.device("cpu"), torch.float32)
    return model.decode_forward(kv_cache), DecodeWorkload(kv_cache, 8, max_context_len=20, max_blocks_per_seq=8, seed=4)


DECODE_INPUTS = ("input_ids", "positions", "seq_lens", "block_tables", "slot_mapping")  # all of them per token


def _key(step: object, batch: dict, dynamic: bool = True) -> str:
    return stored_compile.fingerprint(step, batch, DECODE_INPUTS, dynamic, "InductorBackend")


@pytest.mark.cpu
def test_the_fingerprint_is_the_same_for_the_same_model_and_differs_for_what_the_compile_baked_in():
    tiny = ModelConfig.tiny()
    step, workload = _decode_step(tiny)
    key = _key(step, workload.batch(8))
    again, workload_again = _decode_step(tiny)  # other weights' values and other objects, same everything else
    assert _key(again, workload_again.batch(8)) == key  # the same model built again: one compile serves both
    assert _key(step, workload.batch(3)) == key  # the token dimension is dynamic: any bucket is the same compile
    assert _key(step, workload.batch(3), dynamic=False) != _key(step, workload.batch(8), dynamic=False)
    assert _key(step, workload.batch(8), dynamic=False) != key
    eps = _decode_step(dataclasses.replace(tiny, rms_eps=1e-6))[0]  # a constant in the graph
    assert _key(eps, workload.batch(8)) != key
    assert _key(_decode_step(tiny, num_blocks=96)[0], workload.batch(8)) != key  # a KV cache of another shape
    wider = {**workload.batch(8), "block_tables": torch.zeros(8, 16, dtype=torch.int32)}
    assert _key(step, wider) != key  # an input of another trailing shape
    floating = {**workload.batch(8), "positions": workload.batch(8)["positions"].float()}
    assert _key(step, floating) != key  # an input of another dtype
    other_backend = stored_compile.fingerprint(step, workload.batch(8), DECODE_INPUTS, True, "Other")
    assert other_backend != key


@pytest.mark.cpu
def test_a_fingerprint_is_stable_across_processes():
    step, workload = _decode_step(ModelConfig.tiny())
    script = textwrap.dedent(
        """
        import json, torch
        from hal.compile import stored_compile
        from graphhal.paged_attention import PagedKVCache
        from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
        config = ModelConfig.tiny()
        kv_cache = PagedKVCache(config, 64, torch.device("cpu"), torch.float32)
        step = LlamaDecoder(config, torch.device("cpu"), torch.float32, seed=0).decode_forward(kv_cache)
        batch = DecodeWorkload(kv_cache, 8, max_context_len=20, max_blocks_per_seq=8, seed=4).batch(8)
        names = ("input_ids", "positions", "seq_lens", "block_tables", "slot_mapping")
        print(json.dumps(stored_compile.fingerprint(step, batch, names, True, "InductorBackend")))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == _key(step, workload.batch(8))


@pytest.mark.cpu
def test_an_unreadable_stored_compile_is_ignored_with_a_warning(tmp_path, caplog):
    store = hal.compile.CompileStore(tmp_path)
    store.path("k").write_bytes(b"not a stored compile")
    with caplog.at_level(logging.WARNING, logger="hal.compile.stored_compile"):
        assert store.load("k") is None
    assert "ignoring the stored compile" in caplog.text and str(store.path("k")) in caplog.text
    assert store.load("absent") is None


@pytest.mark.cpu
def test_a_backend_whose_output_cannot_be_stored_ignores_the_store(tmp_path):
    class Counting:
        compile_count = 0

        def __call__(self, gm, example_inputs):
            self.compile_count += 1
            return gm.forward

    forward = hal.compile.CompiledForward(lambda x: x * 2, Counting(), ["x"], store=hal.compile.CompileStore(tmp_path))
    assert forward.store is None
    assert torch.equal(forward(x=torch.ones(3)), torch.full((3,), 2.0))
    assert not any(tmp_path.iterdir())


def _scale_by(factor: float):
    def scaled(x):
        return x * factor

    return scaled


class _PrivateScale(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self._scale = scale

    def forward(self, x):
        return x * self._scale


@pytest.mark.cpu
def test_the_fingerprint_sees_closures_private_values_hooks_and_autocast():
    x = {"x": torch.ones(4, 2)}

    def key(forward):
        return stored_compile.fingerprint(forward, x, ("x",), True, "InductorBackend")

    assert key(_scale_by(2.0)) == key(_scale_by(2.0)) != key(_scale_by(3.0))  # what the closure captured
    assert key(_PrivateScale(2.0)) == key(_PrivateScale(2.0)) != key(_PrivateScale(3.0))  # self._scale
    hooked = _PrivateScale(2.0)
    hooked.register_forward_hook(lambda module, args, output: output + 1)
    assert key(hooked) != key(_PrivateScale(2.0))
    plain = key(_PrivateScale(2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert key(_PrivateScale(2.0)) != plain
    on_other_device = {"x": torch.ones(4, 2, device="meta")}
    assert stored_compile.fingerprint(_PrivateScale(2.0), on_other_device, ("x",), True, "InductorBackend") != plain


@pytest.mark.cpu
def test_a_forward_that_cannot_be_compiled_for_storing_is_compiled_without_the_store(tmp_path, monkeypatch, caplog):
    def unstorable(self, inputs, dynamic):
        self.backend.compile_count += 1  # as a compile that got as far as the backend would
        raise RuntimeError("does not implement SerializableCallable")

    monkeypatch.setattr(stored_compile, "available", lambda: True)
    monkeypatch.setattr(hal.compile.CompiledForward, "_aot_compile", unstorable)
    backend = hal.compile.InductorBackend()
    forward = hal.compile.CompiledForward(lambda x: torch.relu(x) * 2, backend, ["x"], store=hal.compile.CompileStore(tmp_path))
    x = torch.randn(5, 3)
    with caplog.at_level(logging.WARNING, logger="hal.compile.compiled_forward"):
        assert torch.equal(forward(x=x), torch.relu(x) * 2)  # compiled the ordinary way: a store never stops a server
    assert "could not compile the forward for storing" in caplog.text
    assert forward.store is None and backend.compile_count == 1 and not any(tmp_path.iterdir())
    assert torch.equal(forward(x=x[:2]), torch.relu(x[:2]) * 2)  # and that compile serves other sizes


@needs_aot_compile
@pytest.mark.cpu
def test_a_stored_compile_that_fails_on_its_first_call_is_compiled_again(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise AssertionError("expected size 4==6")  # as Inductor's size checks say of an input traced otherwise

    store = hal.compile.CompileStore(tmp_path)
    monkeypatch.setattr(hal.compile.CompileStore, "load", lambda self, key: broken)
    backend = hal.compile.InductorBackend()
    forward = hal.compile.CompiledForward(lambda x: torch.relu(x) * 2, backend, ["x"], store=store)
    x = torch.randn(5, 3)
    with caplog.at_level(logging.WARNING, logger="hal.compile.compiled_forward"):
        assert torch.equal(forward(x=x), torch.relu(x) * 2)
    assert "failed on its first call" in caplog.text and "expected size 4==6" in caplog.text
    assert not forward.loaded and backend.compile_count == 1
    assert len(list(tmp_path.glob("forward-*.bin"))) == 1  # the fresh compile, stored over the broken one


@pytest.mark.cpu
def test_without_aot_compile_the_store_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(stored_compile, "available", lambda: False)
    forward = hal.compile.CompiledForward(lambda x: x * 2, hal.compile.InductorBackend(), ["x"], store=hal.compile.CompileStore(tmp_path))
    assert forward.store is None


@pytest.mark.cpu
def test_a_store_that_cannot_be_written_is_logged_not_fatal(tmp_path, caplog):
    blocked = tmp_path / "a file, not a directory"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="hal.compile.stored_compile"):
        assert not hal.compile.CompileStore(blocked / "forwards").save("k", object())
    assert "could not store the compiled forward" in caplog.text


# The runner over a compile cache directory, in a fresh process: graphs of every bucket from a loaded compile.
_RUNNER_PROCESS = textwrap.dedent(
    """
    import json, random, sys
    import torch
    import hal
    from graphhal.paged_attention import PagedKVCache
    from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
    from runners import DecodeConfig, DecodeRunner

    device = hal.get_device("cuda")
    config = ModelConfig.tiny()
    model = LlamaDecoder(config, device.torch_device, torch.float32, seed=0)
    kv_cache = PagedKVCache(config, 64, device.torch_device, torch.float32)
    workload = DecodeWorkload(kv_cache, 8, max_context_len=20, max_blocks_per_seq=8, seed=4)
    step = model.decode_forward(kv_cache)
    runner = DecodeRunner(step, workload.input_slots(), device, DecodeConfig(
        mode="full", compiler="inductor", buckets=[1, 2, 4, 8], show_progress=False, compile_cache_dir=sys.argv[1]))
    runner.capture()
    differences = []
    sizes = list(range(1, 9))
    random.Random(0).shuffle(sizes)
    for rows in sizes:  # after every bucket is captured, in random order
        batch = workload.batch(rows)
        with torch.no_grad():
            eager = step(**batch).clone()
        differences.append((runner.run(batch) - eager).abs().max().item())
    compiled = runner._capture.strategy.forward
    print(json.dumps({"loaded": compiled.loaded, "compiles": compiled.backend.compile_count, "differences": differences}))
    """
)


@pytest.mark.cuda
@needs_aot_compile
def test_a_restarted_runner_captures_every_bucket_from_the_stored_compile_on_cuda(tmp_path):
    cold = _run(_RUNNER_PROCESS, str(tmp_path))
    assert not cold["loaded"] and cold["compiles"] == 1
    assert len(list((tmp_path / "forwards").glob("forward-*.bin"))) == 1  # beside the caches, in its own folder
    warm = _run(_RUNNER_PROCESS, str(tmp_path))
    assert warm["loaded"] and warm["compiles"] == 0
    assert max(cold["differences"] + warm["differences"]) < 1e-3


@pytest.mark.cuda
@needs_aot_compile
def test_the_restart_bench_loads_the_stored_forward_alone_after_full_inductor_on_cuda():
    from graphhal.bench.setup.restart import measure_restart

    measured = measure_restart("full+inductor", "cuda:0", ModelConfig.tiny(), torch.float32, 8, 32)
    assert measured.cold_compiles == 1 and measured.warm_compiles == 0  # the warm restart traced nothing
    # The floor ran in a third process: the stored forward loaded and called, nothing compiled. (It takes about
    # what the whole warm setup takes: torch's load and first call are most of a restart.)
    assert measured.stored_forward_alone_s is not None and 0 < measured.stored_forward_alone_s < measured.cold_setup_s


class _Gate(torch.nn.Module):
    """A module whose trace depends on a value the fingerprint once described by its type alone (a set)."""

    def __init__(self, allowed) -> None:
        super().__init__()
        self.allowed = allowed

    def forward(self, x):
        return x * 2 if 3 in self.allowed else x - 1


class _Slotted:
    __slots__ = ("scale", "__hidden")

    def __init__(self, scale: float, hidden: int = 0) -> None:
        self.scale = scale
        self.__hidden = hidden


class _Holding(torch.nn.Module):
    """A module holding a value its forward does not read, but the fingerprint cannot tell."""

    def __init__(self, held) -> None:
        super().__init__()
        self.held = held

    def forward(self, x):
        return x * 2


def _plain_key(forward) -> str:
    return stored_compile.fingerprint(forward, {"x": torch.ones(4, 2)}, ("x",), True, "InductorBackend")


@pytest.mark.cpu
def test_values_without_a_dict_are_described_by_their_content():
    """Two forwards differing only in such a value must not share a stored compile: _Gate({1, 2, 3}) traces
    x * 2 and _Gate({1, 2}) traces x - 1, and both once had the same key."""
    assert _plain_key(_Gate({1, 2, 3})) == _plain_key(_Gate({3, 2, 1})) != _plain_key(_Gate({1, 2}))
    assert _plain_key(_Gate(frozenset({3}))) != _plain_key(_Gate(frozenset({4})))
    assert _plain_key(_Gate([(1, {3})])) != _plain_key(_Gate([(1, {4})]))  # a set inside containers
    assert _plain_key(_Gate({"a": frozenset({3})})) != _plain_key(_Gate({"a": frozenset({4})}))
    assert _plain_key(_Gate(_Slotted(2.0))) != _plain_key(_Gate(_Slotted(3.0)))  # an object with __slots__
    assert _plain_key(_Gate(_Slotted(2.0, hidden=1))) != _plain_key(_Gate(_Slotted(2.0, hidden=2)))  # a private slot
    assert _plain_key(_Gate(b"\x03")) != _plain_key(_Gate(b"\x04"))
    assert _plain_key(_Gate(range(4))) != _plain_key(_Gate(range(3)))
    numpy = pytest.importorskip("numpy")
    assert _plain_key(_Gate(numpy.array([1, 3]))) != _plain_key(_Gate(numpy.array([1, 4])))


@pytest.mark.cpu
def test_a_value_the_fingerprint_cannot_describe_is_refused_naming_where_it_sits():
    with pytest.raises(stored_compile.UndescribableError, match=r"^_Holding root\.held is a re\.Pattern \(no attributes to read\), which the fingerprint cannot describe$"):
        _plain_key(_Holding(re.compile("3")))
    with pytest.raises(stored_compile.UndescribableError, match=r"^_Holding root\.held\.rules\[1\] is a _thread\.lock"):
        _plain_key(_Holding({"rules": [1, threading.Lock()]}))


@pytest.mark.cpu
def test_a_forward_holding_a_value_the_fingerprint_cannot_describe_is_compiled_without_the_store(tmp_path, monkeypatch, caplog):
    class StorableCounting:
        storable = True
        compile_count = 0

        def __call__(self, gm, example_inputs):
            self.compile_count += 1
            return gm.forward

    monkeypatch.setattr(stored_compile, "available", lambda: True)
    backend = StorableCounting()
    forward = hal.compile.CompiledForward(_Holding(re.compile("3")), backend, ["x"], store=hal.compile.CompileStore(tmp_path))
    x = torch.randn(5, 3)
    with caplog.at_level(logging.WARNING, logger="hal.compile.compiled_forward"):
        assert torch.equal(forward(x=x), x * 2)
    assert "not storing the compiled forward: _Holding root.held is a re.Pattern" in caplog.text
    assert forward.store is None and backend.compile_count == 1 and not any(tmp_path.iterdir())
