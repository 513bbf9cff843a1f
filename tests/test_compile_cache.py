"""The compile cache directory: a second process loads what the first compiled instead of compiling again.

Real processes, a real Inductor compile (on CPU here: the same caches serve CUDA's kernels), the runner's
``CompileCache``: the first process compiles cold and saves its artifacts into the directory, the second
loads them and finds the FX graph in the cache (an Inductor cache hit, no codegen).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runners import DecodeConfig, GraphConfig
from runners import compile_cache
from runners.compile_cache import ARTIFACTS, CompileCache

pytestmark = pytest.mark.cpu

_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from runners import compile_cache
    from runners.compile_cache import CompileCache

    cache = CompileCache(sys.argv[1])
    cache.activate()
    step = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T) * 3 + 1)
    step(torch.randn(8, 8))
    loaded = cache.directory in compile_cache._loaded  # before save(), which marks it loaded
    print(json.dumps({"loaded": loaded, "saved": cache.save(), "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}))
    """
)


def _fresh_process(directory: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", _PROCESS, str(directory)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restarted_process_loads_what_the_first_compiled(tmp_path):
    cold = _fresh_process(tmp_path)
    assert cold["misses"] >= 1 and cold["hits"] == 0
    # torch 2.6 has no portable artifacts: the on-disk caches alone serve the restart, and nothing is saved.
    assert cold["saved"] == compile_cache.portable_artifacts()
    assert (tmp_path / ARTIFACTS).is_file() == compile_cache.portable_artifacts()
    assert (tmp_path / "inductor").is_dir()  # Inductor's on-disk cache went into the directory
    warm = _fresh_process(tmp_path)
    assert warm["hits"] >= 1 and warm["misses"] == 0
    assert not warm["loaded"]  # the on-disk caches were there: the artifacts held nothing more


@pytest.mark.skipif(not compile_cache.portable_artifacts(), reason="this torch (before 2.7) has no portable compile artifacts")
def test_the_artifacts_alone_warm_a_directory_without_its_on_disk_caches(tmp_path):
    _fresh_process(tmp_path)
    shutil.rmtree(tmp_path / "inductor")  # as on a fresh machine handed only the artifacts file
    shutil.rmtree(tmp_path / "triton", ignore_errors=True)
    warm = _fresh_process(tmp_path)
    assert warm["loaded"] and warm["hits"] >= 1 and warm["misses"] == 0


@pytest.fixture
def fresh_process_state(monkeypatch):
    """activate() points the caches for the whole process: undo it after the test."""
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(variable, "restored after the test")
    monkeypatch.setattr(compile_cache, "_active", None)
    monkeypatch.setattr(compile_cache, "_unwritable", set())


def test_a_torch_without_portable_artifacts_saves_none_and_says_nothing_until_a_file_is_there(tmp_path, fresh_process_state, monkeypatch, caplog):
    # torch 2.6: no save_cache_artifacts / load_cache_artifacts. A runner saves after every capture, so a
    # warning there would repeat for a feature this torch lacks; a file another torch left is worth one.
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts", raising=False)
    cache = CompileCache(tmp_path)
    cache.activate()
    assert not cache.save() and not cache.artifacts.exists()
    assert "artifacts" not in caplog.text
    cache.artifacts.write_bytes(b"left by a newer torch")
    compile_cache._loaded.discard(cache.directory)
    CompileCache(tmp_path).activate()
    assert "cannot load compile artifacts" in caplog.text


def test_a_broken_artifact_file_is_skipped_not_fatal(tmp_path, fresh_process_state):
    (tmp_path / ARTIFACTS).write_bytes(b"not torch cache artifacts")
    CompileCache(tmp_path).activate()  # logs and goes on: a cache must never stop a server
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")


def test_a_second_directory_in_one_process_is_refused_naming_both(tmp_path, fresh_process_state):
    CompileCache(tmp_path / "a").activate()
    CompileCache(tmp_path / "a").activate()  # the same one again is fine
    with pytest.raises(compile_cache.CompileCacheConflictError, match=r"'.*/b' differs from '.*/a'.*process-wide"):
        CompileCache(tmp_path / "b").activate()


def test_the_cache_directory_is_one_config_field_checked_like_the_others():
    config = GraphConfig.from_dict({"decode": {"compiler": "inductor", "compile_cache_dir": "/var/cache/graphhal"}})
    assert config.decode.compile_cache_dir == "/var/cache/graphhal" and config.prefill.compile_cache_dir is None
    with pytest.raises(ValueError, match=r"decode: compile_cache_dir must be a string, got 3"):
        DecodeConfig(compile_cache_dir=3)


def test_an_empty_cache_directory_is_refused_when_the_config_is_built():
    """Path("") is the working directory: a server started from elsewhere would look for its caches there."""
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"decode: compile_cache_dir must name a directory .* or be null .*got ''|got '  '"):
            DecodeConfig(compile_cache_dir=empty)
    with pytest.raises(ValueError, match=r"prefill: compile_cache_dir must name a directory"):
        GraphConfig.from_dict({"prefill": {"compile_cache_dir": ""}})


def test_the_values_torch_itself_puts_in_the_environment_are_overridden_without_a_warning(tmp_path, fresh_process_state, monkeypatch, caplog):
    """Importing torch._dynamo writes torch's default TORCHINDUCTOR_CACHE_DIR into the environment, and the first
    Triton kernel TRITON_CACHE_DIR beneath it: a warning about those fired on every start."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    cache_dir()  # what importing torch._dynamo does
    monkeypatch.setenv("TRITON_CACHE_DIR", triton_cache_dir(0))  # what Inductor's first Triton kernel does
    with caplog.at_level(logging.WARNING, logger="runners.compile_cache"):
        CompileCache(tmp_path).activate()
    assert "overrides" not in caplog.text
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_a_cache_directory_the_user_set_is_overridden_with_a_warning(tmp_path, fresh_process_state, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TRITON_CACHE_DIR")
    with caplog.at_level(logging.WARNING, logger="runners.compile_cache"):
        CompileCache(tmp_path / "graphhal").activate()
    assert f"compile_cache_dir overrides TORCHINDUCTOR_CACHE_DIR={tmp_path / 'mine'} for this process" in caplog.text
    assert "TRITON_CACHE_DIR" not in caplog.text


def test_a_directory_whose_caches_cannot_be_made_is_logged_once_and_left_out(tmp_path, fresh_process_state, caplog):
    (tmp_path / "inductor").write_text("a file where Inductor's cache folder goes")
    cache = CompileCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="runners.compile_cache"):
        cache.activate()
        cache.activate()  # a second runner with the same directory: said once
    assert caplog.text.count("unusable") == 1 and "compiling without it" in caplog.text
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "restored after the test"  # torch's caches stay where they were
    assert not cache.active and not cache.save()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inductor"]


# Root writes through permission bits (CAP_DAC_OVERRIDE): a process running as root first drops the
# capabilities that let it, so the directory is read-only for it as it is for any other user. (Dropping to
# another uid would do too, but that user may not reach this interpreter: /root is often 0700.)
_DROP_ROOTS_FILE_OVERRIDES = textwrap.dedent(
    """
    import ctypes

    def drop_file_overrides():
        libc = ctypes.CDLL(None, use_errno=True)
        caps = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        for cap in caps:  # from the bounding set too, so that no child process gets them back
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
        if libc.capget(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        keep = ~sum(1 << cap for cap in caps) & 0xFFFFFFFF
        data[0].effective &= keep
        data[0].permitted &= keep
        data[0].inheritable &= keep
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    """
)

# A runner whose capture compiles (piecewise, Dynamo), over a directory the process cannot write.
_READ_ONLY_PROCESS = _DROP_ROOTS_FILE_OVERRIDES + textwrap.dedent(
    """
    import json, logging, os, sys
    from pathlib import Path

    directory = Path(sys.argv[1])
    if os.geteuid() == 0:
        try:
            drop_file_overrides()
        except OSError as exc:
            print(json.dumps({"skip": f"running as root and cannot drop CAP_DAC_OVERRIDE ({exc})"}))
            sys.exit(0)
    try:
        (directory / "probe").write_text("")
    except PermissionError:
        pass
    else:
        print(json.dumps({"skip": "could not make a directory this process cannot write"}))
        sys.exit(0)

    import torch
    from graphhal.paged_attention import PagedKVCache
    from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
    from runners import DecodeConfig, DecodeRunner

    logging.basicConfig(level=logging.WARNING)
    config = ModelConfig.tiny()
    model = LlamaDecoder(config, torch.device("cpu"), torch.float32, seed=0)
    kv_cache = PagedKVCache(config, 64, torch.device("cpu"), torch.float32)
    workload = DecodeWorkload(kv_cache, 4, max_context_len=20, max_blocks_per_seq=8, seed=4)
    step = model.decode_forward(kv_cache)
    runner = DecodeRunner(step, workload.input_slots(), "cpu", DecodeConfig(
        mode="piecewise", compiler="eager", buckets=[2, 4], show_progress=False, compile_cache_dir=str(directory)))
    runner.capture()
    batch = workload.batch(3)
    with torch.no_grad():
        difference = (runner.run(batch) - step(**batch)).abs().max().item()
    print(json.dumps({"difference": difference, "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}))
    """
)


def test_a_read_only_cache_directory_is_logged_and_the_capture_compiles_without_it(tmp_path):
    """README: a cache is logged and skipped, never fatal. torch raised PermissionError out of capture()."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    environment = {key: value for key, value in os.environ.items() if key not in compile_cache.ON_DISK_CACHES}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_PROCESS, str(read_only)], capture_output=True, text=True, timeout=600, env=environment
        )
    finally:
        read_only.chmod(0o755)  # for tmp_path's clean-up
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    assert f"compile cache directory {read_only} unusable (PermissionError" in done.stderr
    assert "compiling without it" in done.stderr
    assert outcome["difference"] < 1e-5
    assert not str(outcome["inductor_cache"]).startswith(str(read_only))  # torch's caches stayed its own
    assert not any(read_only.iterdir())
