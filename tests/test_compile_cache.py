"""The compile cache directory: a second process loads what the first compiled instead of compiling again.

Real processes, a real Inductor compile (on CPU here: the same caches serve CUDA's kernels), the runner's
``CompileCache``: the first process compiles cold and saves its artifacts into the directory, the second
loads them and finds the FX graph in the cache (an Inductor cache hit, no codegen).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    assert cold["saved"] and cold["misses"] >= 1 and cold["hits"] == 0
    assert (tmp_path / ARTIFACTS).stat().st_size > 0
    assert (tmp_path / "inductor").is_dir()  # Inductor's on-disk cache went into the directory
    warm = _fresh_process(tmp_path)
    assert warm["hits"] >= 1 and warm["misses"] == 0
    assert not warm["loaded"]  # the on-disk caches were there: the artifacts held nothing more


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
