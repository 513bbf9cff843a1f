"""GraphConfig: both phases' settings from a dict, JSON or server flags, and every validation error."""

from __future__ import annotations

import argparse
import json

import pytest

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


def test_a_mode_the_device_does_not_offer_is_refused_by_check_device():
    registry = hal.DeviceRegistry(load_entry_points=False)

    class NoGraphs:
        @hal.hookimpl
        def hal_device_types(self):
            return ["plain"]

        @hal.hookimpl
        def hal_is_available(self, device):
            return True if device.type == "plain" else None

        @hal.hookimpl
        def hal_graph_modes(self, device):
            return () if device.type == "plain" else None

        @hal.hookimpl
        def hal_make_graph(self, device, mode):
            return None

        @hal.hookimpl
        def hal_capture_session(self, graph, pool, stream):
            return None

        @hal.hookimpl
        def hal_replay(self, graph):
            return None

        @hal.hookimpl
        def hal_synchronize(self, device):
            return True if device.type == "plain" else None

        @hal.hookimpl
        def hal_torch_device(self, device):
            import torch

            return torch.device("cpu") if device.type == "plain" else None

    registry.register(NoGraphs(), "plain-device")
    device = registry.get_device("plain")
    assert device.modes == ("disabled",)
    with pytest.raises(hal.UnsupportedModeError, match=r"decode: device plain does not offer graph mode 'full'; supported modes: disabled"):
        GraphConfig.from_dict({"decode": {"mode": "full"}}).check_device(device)
    GraphConfig.from_dict({"decode": {"mode": "disabled"}, "prefill": {"mode": "disabled", "compiler": "none"}}).check_device(device)
    GraphConfig().check_device(device)  # mode auto: it picks among what the device offers (disabled here)


def test_an_unknown_mode_is_refused_by_check_device_with_the_modes_the_device_has():
    config = GraphConfig.from_dict({"decode": {"mode": "fulll"}})  # building a config asks no device
    with pytest.raises(hal.UnsupportedModeError, match=r"decode: unknown graph mode 'fulll' on device cpu; supported modes: full, breakable, piecewise, disabled"):
        config.check_device("cpu")


def test_inductor_is_refused_on_a_device_that_cannot_record_its_kernels():
    with pytest.raises(hal.UnsupportedModeError, match=r"prefill: device cpu cannot capture Inductor-compiled kernels"):
        GraphConfig(prefill=PrefillConfig(compiler="inductor")).check_device("cpu")
    GraphConfig(decode=DecodeConfig(mode="disabled")).check_device("cpu")
