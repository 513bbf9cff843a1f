"""Per-device pytest markers for graphhal's tests.

- ``@pytest.mark.cpu`` / ``cuda`` / ``npu``: the test needs that device; it is skipped where the device is
  absent, unless the device is required.
- ``--require-device cuda`` (repeatable, or comma-separated; or GRAPHHAL_REQUIRE_DEVICE=cuda,...): a
  required device that is absent fails the run instead of skipping it, and so does a run that collected no
  test for it. A GPU job that silently skipped every GPU test would otherwise look green.
- ``@pytest.mark.gpus(2)``: the test needs that many GPUs (tensor parallel); skipped with fewer, unless the
  run requires them (``--require-device cuda:2``), which then fails instead.

Triton kernels run under Triton's interpreter where there is no GPU; TRITON_INTERPRET must be set before any
kernel is decorated, so it is set here, before the test modules import the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_MARKERS = {
    "cpu": "needs the cpu reference device (runs everywhere)",
    "cuda": "needs a CUDA GPU",
    "npu": "needs real Ascend NPU hardware with torch_npu",
}
REQUIRE_ENV = "GRAPHHAL_REQUIRE_DEVICE"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-device",
        action="append",
        default=[],
        metavar="TYPE",
        help=f"fail (do not skip) tests of this device type when it is absent; also from ${REQUIRE_ENV}",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in DEVICE_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    config.addinivalue_line("markers", "gpus(count): needs that many GPUs of one host (skipped with fewer)")


def _requirements(config: pytest.Config) -> dict[str, int]:
    """Required device type -> how many of it (``cuda:2``: two GPUs; plain ``cuda``: one)."""
    names = list(config.getoption("--require-device")) + [os.environ.get(REQUIRE_ENV, "")]
    required: dict[str, int] = {}
    for part in (p.strip() for name in names for p in name.split(",")):
        if not part:
            continue
        device_type, _, count = part.partition(":")
        if device_type not in DEVICE_MARKERS or (count and not count.isdigit()):
            raise pytest.UsageError(
                f"--require-device: unknown device {part!r}; known: {sorted(DEVICE_MARKERS)}, optionally with a "
                "count (cuda:2)"
            )
        required[device_type] = max(required.get(device_type, 1), int(count or 1))
    return required


def _device_available(device_type: str) -> bool:
    import hal

    return hal.default_registry().is_available(device_type)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection, so only tests that will run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = _requirements(config)
    for device_type in sorted(required):
        if not any(item.get_closest_marker(device_type) for item in items):
            raise pytest.UsageError(
                f"--require-device {device_type}: no collected test carries the {device_type!r} marker "
                "(check -m / -k), so the device would go untested"
            )
        if not _device_available(device_type):
            raise pytest.UsageError(f"--require-device {device_type}: the device is not available on this machine")
        if device_type == "cuda" and torch.cuda.device_count() < required[device_type]:
            raise pytest.UsageError(
                f"--require-device cuda:{required[device_type]}: only {torch.cuda.device_count()} GPU(s) here"
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for device_type in DEVICE_MARKERS:
        if item.get_closest_marker(device_type) and not _device_available(device_type):
            pytest.skip(f"device {device_type!r} is not available here")
    gpus = item.get_closest_marker("gpus")
    if gpus is not None:
        needed, present = gpus.args[0], torch.cuda.device_count()
        if present < needed:
            if _requirements(item.config).get("cuda", 0) >= needed:
                pytest.fail(f"this test needs {needed} GPUs and the run requires them, but {present} are present")
            pytest.skip(f"needs {needed} GPUs, {present} present")


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.cuda)])
def graph_device(request: pytest.FixtureRequest) -> str:
    """Each device with full graphs that CI or the GPU machine can run: cpu, cuda."""
    return request.param
