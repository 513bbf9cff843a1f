"""The device registry: built-in plugins, entry-point discovery, isolation of broken plugins, the facade."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import hal
from support.installed_distribution import install_distribution, site  # noqa: F401 (site: fixture)
from runners import DecodeConfig, DecodeRunner, InputSlot

# A third-party device plugin, as a vendor would ship it: its own module, its own device type ("replaydev"),
# tensors on the cpu, graphs from graphhal's recording graph.
THIRD_PARTY_PLUGIN = '''
import torch
import hal
from devices.cpu.recorded_graph import RecordedGraph, RecordingPool

@hal.hookimpl
def hal_device_types():
    return ["replaydev"]

@hal.hookimpl
def hal_is_available(device):
    return True

@hal.hookimpl
def hal_graph_modes(device):
    return ("full",)

@hal.hookimpl
def hal_torch_device(device):
    return torch.device("cpu")

@hal.hookimpl
def hal_make_graph(device, mode):
    return ReplayDevGraph(str(device))

@hal.hookimpl
def hal_capture_session(graph, pool):   # a subset of the spec's arguments is allowed
    return graph.record(pool)

@hal.hookimpl
def hal_replay(graph):
    REPLAYS.append(graph)
    graph.replay()

@hal.hookimpl
def hal_graph_pool(device):
    return RecordingPool()

@hal.hookimpl
def hal_synchronize(device):
    pass

class ReplayDevGraph(RecordedGraph):
    pass

REPLAYS = []
'''


def test_builtin_devices_are_registered():
    registry = hal.DeviceRegistry(load_entry_points=False)
    assert registry.device_types() == {"cpu": "devices.cpu", "cuda": "devices.cuda", "npu": "devices.npu"}
    assert registry.broken == {}
    assert "cpu" in registry.available_device_types()


@pytest.mark.cpu
def test_get_device_returns_one_facade_per_name_with_modes():
    registry = hal.DeviceRegistry(load_entry_points=False)
    device = registry.get_device("cpu")
    assert registry.get_device("cpu") is device
    assert device.modes == ("full", "breakable", "piecewise", "disabled")
    assert device.torch_device == torch.device("cpu")
    assert not device.needs_graph_update


def test_unknown_device_lists_known_types():
    registry = hal.DeviceRegistry(load_entry_points=False)
    with pytest.raises(hal.UnknownDeviceError, match=r"'tpu'.*known device types: cpu, cuda, npu"):
        registry.get_device("tpu:0")


def test_bad_device_name_says_the_allowed_form():
    with pytest.raises(ValueError, match=r"index after ':' must be a non-negative integer"):
        hal.DeviceId.parse("cuda:zero")
    with pytest.raises(ValueError, match=r"'type' or 'type:index'"):
        hal.DeviceId.parse(":1")


def test_npu_skeleton_is_registered_but_unavailable_without_ascend():
    registry = hal.DeviceRegistry(load_entry_points=False)
    with pytest.raises(hal.DeviceUnavailableError, match=r"npu.*served by plugin 'devices.npu'.*not available"):
        registry.get_device("npu")


@pytest.mark.cpu
def test_unsupported_mode_lists_supported_modes():
    device = hal.DeviceRegistry(load_entry_points=False).get_device("cpu")
    with pytest.raises(hal.UnsupportedModeError, match=r"'fast'.*supported modes: full, breakable, piecewise, disabled"):
        device.make_graph("fast")
    with pytest.raises(hal.UnsupportedModeError, match=r"piecewise graph is not one graph object.*PiecewiseBackend"):
        device.make_graph("piecewise")
    with pytest.raises(ValueError, match=r"unknown graph mode 'fast'; modes: auto, full, breakable, piecewise, disabled"):
        DecodeRunner(lambda x: x, [InputSlot("x", torch.float32)], device, DecodeConfig(mode="fast"))


@pytest.mark.cpu
def test_mode_auto_is_no_devices_mode_and_making_its_graph_says_what_resolves_it():
    device = hal.DeviceRegistry(load_entry_points=False).get_device("cpu")
    assert hal.GraphMode.AUTO not in device.modes
    assert hal.GraphMode.AUTO not in hal.GraphMode.device_modes()
    with pytest.raises(hal.UnsupportedModeError, match=r"mode 'auto' is not a graph mode a device captures: a runner resolves it.*\(full, breakable, piecewise, disabled\)"):
        device.make_graph(hal.GraphMode.AUTO)


@pytest.mark.cpu
def test_replaying_a_graph_the_plugin_does_not_own_is_an_error():
    device = hal.DeviceRegistry(load_entry_points=False).get_device("cpu")
    with pytest.raises(hal.GraphHalError, match="does not recognise graph"):
        device.replay(object())


@pytest.mark.cpu
def test_update_on_a_device_without_host_parameters_is_an_error():
    device = hal.DeviceRegistry(load_entry_points=False).get_device("cpu")
    with pytest.raises(hal.GraphHalError, match="nothing to update"):
        device.update(device.make_graph("full"), {"seq_lens": [1]})


@pytest.mark.cpu
def test_replay_calls_the_owner_directly_without_searching_plugins(monkeypatch: pytest.MonkeyPatch):
    registry = hal.DeviceRegistry(load_entry_points=False)
    device = registry.get_device("cpu")
    x = torch.ones(3)
    graph = device.make_graph("full")
    with device.capture_session(graph, device.graph_pool()):
        y = x * 2

    def searched(*args, **kwargs):
        raise AssertionError("replay went through pluggy's hook dispatch")

    monkeypatch.setattr(registry.plugin_manager.hook, "hal_replay", searched)
    x.fill_(5)
    device.replay(graph)
    assert torch.equal(y, torch.full((3,), 10.0))


@pytest.mark.cpu
def test_third_party_plugin_from_entry_point_runs_decode_runner_unchanged(site: Path):
    install_distribution(site, "replaydev_plugin", {"replaydev": "replaydev_impl"}, {"replaydev_impl": THIRD_PARTY_PLUGIN})
    registry = hal.DeviceRegistry()
    assert registry.device_types()["replaydev"] == "replaydev"
    device = registry.get_device("replaydev")

    weight = torch.randn(4, 4)

    def forward(*, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ weight) + 1

    runner = DecodeRunner(forward, [InputSlot("x", torch.float32, (4,))], device, DecodeConfig(max_bs=8, show_progress=False))
    report = runner.capture()
    assert report.device == "replaydev" and report.buckets == (8, 4, 2, 1)
    for rows in (1, 3, 8):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(runner.run({"x": x}), forward(x=x))

    import replaydev_impl

    assert len(replaydev_impl.REPLAYS) == 3  # the runs went through the plugin's graphs, not eagerly


# A plugin serving two device types: it is asked about its own devices only, each by its own id, and its
# hooks never ask "is this mine?" (one that is asked about another plugin's device fails the test).
TWO_TYPE_PLUGIN = '''
import torch
import hal
from devices.cpu.recorded_graph import RecordedGraph, RecordingPool

SERVED = ("twin_a", "twin_b")
ASKED = []  # (hook, device type) of every per-device call

def _own(hook, device):
    assert device.type in SERVED, f"{hook} asked about {device}, which this plugin does not serve"
    ASKED.append((hook, device.type))

@hal.hookimpl
def hal_device_types():
    return list(SERVED)

@hal.hookimpl
def hal_is_available(device):
    _own("hal_is_available", device)
    return True

@hal.hookimpl
def hal_graph_modes(device):
    _own("hal_graph_modes", device)
    return ("full",) if device.type == "twin_a" else ()

@hal.hookimpl
def hal_torch_device(device):
    _own("hal_torch_device", device)
    return torch.device("cpu")

@hal.hookimpl
def hal_make_graph(device, mode):
    _own("hal_make_graph", device)
    return RecordedGraph(str(device))

@hal.hookimpl
def hal_capture_session(graph, pool):
    return graph.record(pool)

@hal.hookimpl
def hal_replay(graph):
    graph.replay()

@hal.hookimpl
def hal_graph_pool(device):
    _own("hal_graph_pool", device)
    return RecordingPool()

@hal.hookimpl
def hal_synchronize(device):
    _own("hal_synchronize", device)
'''


@pytest.mark.cpu
def test_a_plugin_serving_two_device_types_is_asked_about_each_of_its_own_only(site: Path):
    install_distribution(site, "twin_plugin", {"twins": "twins_impl"}, {"twins_impl": TWO_TYPE_PLUGIN})
    registry = hal.DeviceRegistry()
    assert registry.device_types()["twin_a"] == registry.device_types()["twin_b"] == "twins"
    twin_a, twin_b, cpu = (registry.get_device(name) for name in ("twin_a", "twin_b", "cpu"))
    assert twin_a.modes == ("full", "breakable", "piecewise", "disabled") and twin_b.modes == ("disabled",)
    assert cpu.plugin_name == "devices.cpu"  # the built-in device is untouched, its plugin never asks "mine?"

    weight = torch.randn(4, 4)

    def forward(*, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ weight)

    slots = [InputSlot("x", torch.float32, (4,))]
    for device, mode in ((twin_a, "full"), (twin_b, "disabled"), (cpu, "full")):
        runner = DecodeRunner(forward, slots, device, DecodeConfig(mode=mode, max_bs=4, show_progress=False))
        runner.capture()
        x = torch.randn(3, 4)
        torch.testing.assert_close(runner.run({"x": x}), forward(x=x))

    import twins_impl

    assert {device_type for _, device_type in twins_impl.ASKED} == {"twin_a", "twin_b"}
    assert ("hal_make_graph", "twin_a") in twins_impl.ASKED and ("hal_make_graph", "twin_b") not in twins_impl.ASKED


def test_plugin_that_fails_to_import_is_isolated_and_listed(site: Path):
    install_distribution(
        site,
        "broken_plugin",
        {"brokendev": "brokendev_impl"},
        {"brokendev_impl": "raise ImportError('libvendor.so: cannot open shared object file')\n"},
    )
    with pytest.warns(hal.PluginLoadWarning, match=r"'brokendev'.*libvendor\.so"):
        registry = hal.DeviceRegistry()
    assert registry.broken["brokendev"].reason == "ImportError: libvendor.so: cannot open shared object file"
    assert "cpu" in registry.available_device_types()  # the rest keep working
    with pytest.raises(hal.UnknownDeviceError, match=r"failed to load: brokendev .*libvendor\.so"):
        registry.get_device("brokendev")


def test_plugin_missing_a_required_hook_is_isolated(site: Path):
    source = "import hal\n@hal.hookimpl\ndef hal_device_types():\n    return ['halfdev']\n"
    install_distribution(site, "half_plugin", {"halfdev": "halfdev_impl"}, {"halfdev_impl": source})
    with pytest.warns(hal.PluginLoadWarning, match=r"does not implement required hook.*hal_replay"):
        registry = hal.DeviceRegistry()
    assert "halfdev" not in registry.device_types()


def test_plugin_with_a_misspelled_hook_is_isolated(site: Path):
    source = "import hal\n@hal.hookimpl\ndef hal_replay_graph(graph):\n    return True\n"
    install_distribution(site, "typo_plugin", {"typodev": "typodev_impl"}, {"typodev_impl": source})
    with pytest.warns(hal.PluginLoadWarning, match=r"hal_replay_graph"):
        registry = hal.DeviceRegistry()
    assert "typodev" in registry.broken


def test_two_entry_point_plugins_cannot_serve_one_type(site: Path):
    install_distribution(site, "first_plugin", {"first": "first_impl"}, {"first_impl": THIRD_PARTY_PLUGIN})
    install_distribution(site, "second_plugin", {"second": "second_impl"}, {"second_impl": THIRD_PARTY_PLUGIN})
    with pytest.warns(hal.PluginLoadWarning, match=r"'replaydev' is already served by plugin"):
        registry = hal.DeviceRegistry()
    assert registry.device_types()["replaydev"] in {"first", "second"}
    assert len(registry.broken) == 1


def test_no_warning_when_every_plugin_loads():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hal.DeviceRegistry()


# --- plugins that break the contract in other ways: each is left out or named, never fatal ------------------


def _plugin_variant(device_type: str, replacements: dict[str, str]) -> str:
    """THIRD_PARTY_PLUGIN serving ``device_type``, with some hook bodies' return lines replaced."""
    source = THIRD_PARTY_PLUGIN.replace("replaydev", device_type)
    for old, new in replacements.items():
        assert old in source, old
        source = source.replace(old, new)
    return source


def test_a_plugin_calling_sys_exit_at_import_is_isolated_like_any_failure(site: Path, capsys):
    from graphhal.cli.main import main

    install_distribution(site, "exit_plugin", {"exitdev": "exitdev_impl"}, {"exitdev_impl": "import sys\nsys.exit(3)\n"})
    with pytest.warns(hal.PluginLoadWarning, match=r"'exitdev'.*SystemExit: 3"):
        registry = hal.DeviceRegistry()
    assert "exitdev" in registry.broken and "cpu" in registry.available_device_types()
    assert main(["info"]) == 0  # graphhal info survives it too, and lists it
    assert "exitdev" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("replacements", "message"),
    [
        ({'return ["strdev"]': 'return "abc"'}, r"hal_device_types returned 'abc'; expected a non-empty list"),
        ({'return ("full",)': 'return "full"'}, r"hal_graph_modes\('strdev'\) returned 'full'; expected a list"),
    ],
)
def test_a_hook_answering_a_string_for_a_list_leaves_the_plugin_out(site: Path, replacements, message):
    source = _plugin_variant("strdev", replacements)
    module = f"strdev_impl_{abs(hash(message))}"  # one module per case: an imported module stays in sys.modules
    install_distribution(site, "str_plugin", {"strdev": module}, {module: source})
    with pytest.warns(hal.PluginLoadWarning, match=message):
        registry = hal.DeviceRegistry()
    assert "strdev" in registry.broken
    assert not {"a", "b", "c", "strdev"} & set(registry.device_types())


def test_is_available_that_raises_counts_as_unavailable_with_the_reason(site: Path):
    source = _plugin_variant("flakydev", {"def hal_is_available(device):\n    return True": 'def hal_is_available(device):\n    raise OSError("no driver")'})
    install_distribution(site, "flaky_plugin", {"flakydev": "flakydev_raising"}, {"flakydev_raising": source})
    registry = hal.DeviceRegistry()
    assert registry.available_device_types() == [t for t in registry.available_device_types() if t != "flakydev"]
    assert not registry.is_available("flakydev")
    assert registry.unavailable_reason("flakydev") == "plugin 'flakydev' raised in hal_is_available: OSError: no driver"
    with pytest.raises(hal.DeviceUnavailableError, match=r"flakydev.*not available.*OSError: no driver"):
        registry.get_device("flakydev")


def test_two_distributions_publishing_one_entry_point_name_are_both_named(site: Path):
    install_distribution(site, "first_dist", {"samename": "first_impl"}, {"first_impl": THIRD_PARTY_PLUGIN})
    install_distribution(site, "second_dist", {"samename": "second_impl"}, {"second_impl": THIRD_PARTY_PLUGIN})
    with pytest.warns(hal.PluginLoadWarning, match=r"'samename' is published twice: .*_dist\).*is loaded, .*_dist\) is left out"):
        registry = hal.DeviceRegistry()
    assert registry.device_types()["replaydev"] == "samename"


@pytest.mark.parametrize(
    ("replacements", "hook", "expected"),
    [
        ({"@hal.hookimpl\ndef hal_synchronize": "@hal.hookimpl\ndef hal_conventions(device):\n    return {'seq_len_fill': 1}\n\n@hal.hookimpl\ndef hal_synchronize"}, "hal_conventions", "a hal.DeviceConventions"),
        ({'return torch.device("cpu")': 'return "cpu"'}, "hal_torch_device", "a torch.device"),
        # A graph hook has no "not mine" to answer any more: None breaks the contract.
        ({"    return ReplayDevGraph(str(device))": "    return None"}, "hal_make_graph", "a graph object for typedev in mode 'full'"),
        ({"    return graph.record(pool)": "    return None"}, "hal_capture_session", "a context manager"),
    ],
)
def test_a_hook_answering_the_wrong_type_is_named_when_it_is_asked(site: Path, replacements, hook, expected):
    source = _plugin_variant("typedev", replacements)
    module = f"typedev_impl_{hook}"  # one module per case: an imported module stays in sys.modules
    install_distribution(site, "type_plugin", {"typedev": module}, {module: source})
    registry = hal.DeviceRegistry()
    with pytest.raises(hal.PluginContractError, match=rf"plugin 'typedev': {hook} returned .*expected {expected}"):
        device = registry.get_device("typedev")  # per-device hooks are asked here, graph hooks below
        graph = device.make_graph("full")
        with device.capture_session(graph, device.graph_pool()):
            pass


def test_memory_stats_of_the_wrong_type_is_named_when_asked(site: Path):
    source = _plugin_variant("statsdev", {"@hal.hookimpl\ndef hal_synchronize": "@hal.hookimpl\ndef hal_memory_stats(device, pool):\n    return {'pool_bytes': 1}\n\n@hal.hookimpl\ndef hal_synchronize"})
    install_distribution(site, "stats_plugin", {"statsdev": "statsdev_impl"}, {"statsdev_impl": source})
    device = hal.DeviceRegistry().get_device("statsdev")
    with pytest.raises(hal.PluginContractError, match=r"'statsdev': hal_memory_stats returned \{'pool_bytes': 1\}.*expected a hal.MemoryStats"):
        device.memory_stats()


def test_is_available_answering_other_than_a_bool_counts_as_unavailable_naming_the_hook(site: Path):
    source = _plugin_variant("saysno", {"def hal_is_available(device):\n    return True": 'def hal_is_available(device):\n    return "no"'})
    install_distribution(site, "no_plugin", {"saysno": "saysno_impl"}, {"saysno_impl": source})
    registry = hal.DeviceRegistry()
    assert not registry.is_available("saysno")  # a non-empty string would read as True
    assert "hal_is_available returned 'no' (str); expected True or False" in registry.unavailable_reason("saysno")
