"""The per-device markers: absent devices skip, required absent devices fail the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_TESTS = """
import pytest

@pytest.mark.cpu
def test_on_cpu():
    pass

@pytest.mark.npu
def test_on_npu():
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A scratch project with graphhal's own conftest.py and pytest configuration."""
    pytester.makeconftest((ROOT / "conftest.py").read_text())
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    pytester.makepyfile(test_sample=SAMPLE_TESTS)
    return pytester


def test_tests_of_an_absent_device_are_skipped(project: pytest.Pytester):
    result = project.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*device 'npu' is not available here*"])


def test_a_required_absent_device_fails_instead_of_skipping(project: pytest.Pytester):
    result = project.runpytest("--require-device", "npu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--require-device npu: the device is not available on this machine*"])


def test_the_environment_variable_requires_devices_too(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GRAPHHAL_REQUIRE_DEVICE", "cpu,npu")
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_a_required_device_with_no_collected_test_fails(project: pytest.Pytester):
    result = project.runpytest("--require-device", "cpu", "-m", "npu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no collected test carries the 'cpu' marker*"])


def test_a_required_available_device_runs(project: pytest.Pytester):
    result = project.runpytest("--require-device", "cpu", "-m", "cpu")
    result.assert_outcomes(passed=1, deselected=1)


def test_unknown_markers_are_rejected(project: pytest.Pytester):
    project.makepyfile(test_typo="import pytest\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    result = project.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*'gpu' not found in `markers` configuration option*"])
