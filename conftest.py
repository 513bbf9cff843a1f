"""Per-device pytest markers for graphhal's tests.

- ``@pytest.mark.cpu`` / ``cuda`` / ``npu``: the test needs that device; it is skipped where the device is
  absent, unless the device is required.
- ``--require-device cuda`` (repeatable, or comma-separated; or GRAPHHAL_REQUIRE_DEVICE=cuda,...): a
  required device that is absent fails the run instead of skipping it, and so does a run that collected no
  test for it. A GPU job that silently skipped every GPU test would otherwise look green.

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


def _required_devices(config: pytest.Config) -> set[str]:
    names = list(config.getoption("--require-device")) + [os.environ.get(REQUIRE_ENV, "")]
    required = {part.strip() for name in names for part in name.split(",") if part.strip()}
    unknown = required - DEVICE_MARKERS.keys()
    if unknown:
        raise pytest.UsageError(f"--require-device: unknown device {sorted(unknown)}; known: {sorted(DEVICE_MARKERS)}")
    return required


def _device_available(device_type: str) -> bool:
    import hal

    return hal.default_registry().is_available(device_type)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection, so only tests that will run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = _required_devices(config)
    for device_type in sorted(required):
        if not any(item.get_closest_marker(device_type) for item in items):
            raise pytest.UsageError(
                f"--require-device {device_type}: no collected test carries the {device_type!r} marker "
                "(check -m / -k), so the device would go untested"
            )
        if not _device_available(device_type):
            raise pytest.UsageError(f"--require-device {device_type}: the device is not available on this machine")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for device_type in DEVICE_MARKERS:
        if item.get_closest_marker(device_type) and not _device_available(device_type):
            pytest.skip(f"device {device_type!r} is not available here")


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.cuda)])
def graph_device(request: pytest.FixtureRequest) -> str:
    """Each device with full graphs that CI or the GPU machine can run: cpu, cuda."""
    return request.param
