"""GraphConfig: both phases' settings from a dict, JSON or server flags, and every validation error."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import hal
from runners import DecodeConfig, GraphConfig, PrefillConfig, default_prefill_buckets

pytestmark = pytest.mark.cpu


def test_both_phases_default_to_mode_auto():
    config = GraphConfig()
    assert (config.decode.mode, config.decode.compiler, config.decode.max_bs) == ("auto", "none", 256)
    assert (config.prefill.mode, config.prefill.compiler, config.prefill.max_tokens) == ("auto", "none", 4096)
    assert config.prefill.buckets == default_prefill_buckets(4096)


def test_default_prefill_buckets_follow_the_documented_steps():
    buckets = default_prefill_buckets(4096)
    assert buckets[:9] == [4, 8, 12, 16, 20, 24, 28, 32, 48]
    assert [b for b in buckets if 256 <= b <= 576] == [256, 288, 320, 352, 384, 416, 448, 480, 512, 576]
    assert buckets[-3:] == [3584, 3840, 4096]
    assert default_prefill_buckets(100) == [4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 80, 96, 100]


def test_from_dict_and_json_build_both_phases():
    data = {"decode": {"mode": "breakable", "max_bs": 16}, "prefill": {"max_tokens": 64, "compiler": "inductor", "max_requests": 8}}
    for config in (GraphConfig.from_dict(data), GraphConfig.from_json(json.dumps(data))):
        assert config.decode.mode == "breakable" and config.decode.buckets == [1, 2, 4, 8, 12, 16]
        assert config.prefill.compiler == "inductor" and config.prefill.buckets[-1] == 64
        assert config.prefill.max_requests == 8
    assert GraphConfig.from_dict(config.to_dict()) == config


def test_server_flags_override_the_json_config():
    parser = argparse.ArgumentParser()
    GraphConfig.add_arguments(parser)
    args = parser.parse_args(
        [
            "--graph-config", '{"decode": {"max_bs": 64, "mode": "full"}}',
            "--graph-mode-decode", "piecewise",
            "--graph-buckets-prefill", "8,16,32",
            "--graph-compiler-prefill", "inductor",
            "--graph-max-requests", "4",
        ]
    )  # fmt: skip
    config = GraphConfig.from_args(args)
    assert (config.decode.mode, config.decode.max_bs, config.decode.compiler) == ("piecewise", 64, "eager")
    assert (config.prefill.buckets, config.prefill.compiler, config.prefill.max_requests) == ([8, 16, 32], "inductor", 4)
    assert GraphConfig.from_args(["--graph-max-bs", "8"]).decode.buckets == [1, 2, 4, 8]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"decdoe": {}}, r"unknown phase\(s\) 'decdoe' in graph config; phases: decode, prefill"),
        ({"decode": {"max_batch": 8}}, r"decode: unknown setting\(s\) 'max_batch'; decode settings: mode, buckets"),
        ({"decode": {"buckets": [0, 4]}}, r"decode buckets must be positive, got \[0, 4\]"),
        ({"decode": {"buckets": [4, 2, 8]}}, r"decode buckets must be strictly increasing"),
        ({"prefill": {"buckets": []}}, r"prefill buckets must not be empty"),
        ({"decode": {"buckets": [1, 2], "max_bs": 4}}, r"largest bucket \(2\) must equal max_bs \(4\)"),
        ({"prefill": {"max_tokens": -1}}, r"prefill: max_tokens must be a positive integer, got -1"),
        ({"prefill": {"max_requests": 0}}, r"prefill: max_requests must be a positive integer, got 0"),
        ({"decode": {"compiler": "eager"}}, r"decode: compiler 'eager' does not go with mode 'auto'; mode 'auto' takes: none, inductor"),
        ({"decode": {"mode": "full", "compiler": "eager"}}, r"decode: compiler 'eager' does not go with mode 'full'; mode 'full' takes: none, inductor"),
        ({"prefill": {"mode": "piecewise", "compiler": "none"}}, r"prefill: compiler 'none' does not go with mode 'piecewise'; .* takes: eager, inductor"),
        ({"decode": {"warmup_runs": 0}}, r"warmup_runs must be at least 1"),
        ({"decode": "full"}, r"decode: settings must be a mapping"),
    ],
)
def test_every_invalid_config_is_refused_with_what_is_allowed(data, message):
    with pytest.raises(ValueError, match=message):
        GraphConfig.from_dict(data)


def test_bad_json_and_bad_flags_are_refused():
    with pytest.raises(ValueError, match=r"not valid JSON"):
        GraphConfig.from_json("{decode: full}")
    with pytest.raises(ValueError, match=r"--graph-config is not valid JSON"):
        GraphConfig.from_args(["--graph-config", "{nope"])
    with pytest.raises(ValueError, match=r"--graph-buckets-decode takes comma-separated integers like 1,2,4,8; got '1,two'"):
        GraphConfig.from_args(["--graph-buckets-decode", "1,two"])


class DeclaringPlugin:
    """A device plugin that declares ``modes`` for ``device_type`` and is never asked to make a graph."""

    def __init__(self, device_type: str, modes: tuple[str, ...], available: bool = True) -> None:
        self.device_type, self.modes, self.available = device_type, modes, available

    @hal.hookimpl
    def hal_device_types(self):
        return [self.device_type]

    @hal.hookimpl
    def hal_is_available(self, device):
        return self.available

    @hal.hookimpl
    def hal_graph_modes(self, device):
        return self.modes

    @hal.hookimpl
    def hal_torch_device(self, device):
        return torch.device("cpu")

    @hal.hookimpl
    def hal_make_graph(self, device, mode):
        raise AssertionError("no graph is made to check a config")

    @hal.hookimpl
    def hal_capture_session(self, graph, pool, stream):
        raise AssertionError("nothing is captured to check a config")

    @hal.hookimpl
    def hal_replay(self, graph):
        raise AssertionError("nothing is replayed to check a config")

    @hal.hookimpl
    def hal_synchronize(self, device):
        pass


def test_a_mode_the_device_does_not_offer_is_refused_by_check_device():
    registry = hal.DeviceRegistry(load_entry_points=False)
    registry.register(DeclaringPlugin("plain", ()), "plain-device")
    device = registry.get_device("plain")
    assert device.modes == ("disabled",)
    with pytest.raises(hal.UnsupportedModeError, match=r"decode: device plain does not offer graph mode 'full'; supported modes: disabled"):
        GraphConfig.from_dict({"decode": {"mode": "full"}}).check_device(device)
    GraphConfig.from_dict({"decode": {"mode": "disabled"}, "prefill": {"mode": "disabled", "compiler": "none"}}).check_device(device)
    GraphConfig().check_device(device)  # mode auto: it picks among what the device offers (disabled here)


MODES = "auto, full, breakable, piecewise, disabled"


@pytest.mark.parametrize(
    "mode, message",
    [
        ("fast", rf"decode: unknown graph mode 'fast'; modes: {MODES} \(graphhal's own, and those the device plugins"),
        ("fulll", rf"decode: unknown graph mode 'fulll'; modes: {MODES}"),
        ("FULL", rf"decode: unknown graph mode 'FULL' \(did you mean 'full'\?\); modes: {MODES}"),
        ("Auto", rf"decode: unknown graph mode 'Auto' \(did you mean 'auto'\?\); modes: {MODES}"),
        ("", rf"decode: unknown graph mode ''; modes: {MODES}"),
    ],
)
def test_a_mode_neither_graphhal_nor_an_installed_plugin_names_is_refused_when_the_config_is_built(mode, message):
    with pytest.raises(ValueError, match=message):
        GraphConfig.from_dict({"decode": {"mode": mode}})
    with pytest.raises(ValueError, match=message):
        DecodeConfig(mode=mode)


def test_a_mode_an_installed_plugin_declares_passes_the_build_without_its_device(monkeypatch):
    registry = hal.DeviceRegistry(load_entry_points=False)
    registry.register(DeclaringPlugin("turbodev", ("full", "turbo"), available=False), "turbo-plugin")  # absent
    monkeypatch.setattr(hal.registry, "_default_registry", registry)
    config = GraphConfig.from_dict({"decode": {"mode": "turbo"}})
    assert (config.decode.mode, config.decode.compiler) == ("turbo", "none")  # a plugin's mode takes "none"
    with pytest.raises(ValueError, match=r"unknown graph mode 'Turbo' \(did you mean 'turbo'\?\); modes: .*disabled, turbo"):
        DecodeConfig(mode="Turbo")
    with pytest.raises(hal.UnsupportedModeError, match=r"decode: unknown graph mode 'turbo' on device cpu; supported modes: full"):
        config.check_device("cpu")  # the cpu device does not offer it


def test_the_modes_and_compilers_are_enums_that_configs_keep_as_plain_names():
    config = DecodeConfig(mode=hal.GraphMode.BREAKABLE, compiler=hal.Compiler.INDUCTOR)
    assert config.to_dict()["mode"] == "breakable" and type(config.to_dict()["mode"]) is str
    assert config.to_dict()["compiler"] == "inductor" and type(config.to_dict()["compiler"]) is str
    assert json.loads(json.dumps(GraphConfig(decode=config).to_dict()))["decode"]["compiler"] == "inductor"
    assert {hal.Compiler.EAGER: 1}["eager"] == 1 and f"{hal.Compiler.NONE}" == "none"
    assert DecodeConfig().mode == hal.GraphMode.AUTO == "auto"


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -5.0])
def test_agreement_timeout_must_be_finite_and_positive_when_the_config_is_built(timeout):
    # An infinite timeout used to pass here and raise OverflowError when a runner built its rank group.
    with pytest.raises(ValueError, match=r"decode: agreement_timeout_s must be a finite, positive number of seconds"):
        GraphConfig.from_dict({"decode": {"agreement_timeout_s": timeout}})


def test_inductor_is_refused_on_a_device_that_cannot_record_its_kernels_in_every_mode_auto_included():
    # The cpu device answers hal_compiled_capture_problem for compiler inductor: what it cannot capture, and
    # which compiler to use instead.
    cannot = r"device cpu cannot capture mode '{}' with compiler 'inductor': .*Inductor's fused C\+\+ kernels.*use compiler '{}'"
    with pytest.raises(hal.UnsupportedModeError, match="prefill: " + cannot.format("auto", "none")):
        GraphConfig(prefill=PrefillConfig(compiler="inductor")).check_device("cpu")
    cpu = hal.get_device("cpu")
    for mode, instead in (("full", "none"), ("breakable", "none"), ("piecewise", "eager")):
        with pytest.raises(hal.UnsupportedModeError, match="decode: " + cannot.format(mode, instead)):
            DecodeConfig(mode=mode, compiler="inductor").check_device(cpu)
    GraphConfig(decode=DecodeConfig(mode="disabled")).check_device(cpu)
    DecodeConfig(mode="piecewise", compiler="eager").check_device(cpu)
