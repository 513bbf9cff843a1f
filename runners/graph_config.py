"""``GraphConfig``: the graph settings of both phases in one object, from a dict, JSON or server flags.

    parser = argparse.ArgumentParser()
    GraphConfig.add_arguments(parser)            # --graph-config, --graph-mode-decode, ...
    config = GraphConfig.from_args(parser.parse_args())
    config.check_device(device)
    DecodeRunner(step, slots, device, config.decode); PrefillRunner(..., config.prefill)

The dict (and JSON) form names phases at the top level: ``{"decode": {"mode": "full", "max_bs": 64},
"prefill": {"mode": "piecewise", "max_tokens": 2048, "compiler": "inductor"}}``. Flags override the fields
``--graph-config`` sets.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import hal
from runners.config import DecodeConfig, PhaseConfig, PrefillConfig

PHASES: dict[str, type[PhaseConfig]] = {"decode": DecodeConfig, "prefill": PrefillConfig}


@dataclass
class GraphConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GraphConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"graph config must be a mapping of phase -> settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(PHASES))
        if unknown:
            raise ValueError(f"unknown phase(s) {', '.join(map(repr, unknown))} in graph config; phases: {', '.join(PHASES)}")
        return cls(**{phase: _phase_from_dict(phase, data.get(phase, {})) for phase in PHASES})  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, text: str) -> "GraphConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"graph config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {phase: getattr(self, phase).to_dict() for phase in PHASES}

    def check_device(self, device: "str | hal.Device") -> None:
        device = hal.get_device(device)
        for phase in PHASES:
            getattr(self, phase).check_device(device)

    # --- command-line flags -----------------------------------------------------------------------------

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the flags a server exposes: ``--graph-config JSON`` plus one flag per common field."""
        group = parser.add_argument_group("device graphs (graphhal)")
        group.add_argument("--graph-config", metavar="JSON", help="both phases as JSON, e.g. '{\"decode\": {\"mode\": \"full\"}}'")
        for phase in PHASES:
            group.add_argument(f"--graph-mode-{phase}", metavar="MODE", help=f"{phase} graph mode")
            group.add_argument(f"--graph-buckets-{phase}", metavar="N,N,...", help=f"{phase} buckets, comma-separated")
            group.add_argument(f"--graph-compiler-{phase}", metavar="NAME", help=f"{phase} compiler: none, eager or inductor")
        group.add_argument("--graph-max-bs", type=int, metavar="N", help="largest decode batch run on a graph")
        group.add_argument("--graph-max-tokens", type=int, metavar="N", help="largest prefill token count run on graphs")
        group.add_argument("--graph-max-requests", type=int, metavar="N", help="most requests in one prefill batch")

    @classmethod
    def from_args(cls, args: argparse.Namespace | Sequence[str]) -> "GraphConfig":
        """Build from parsed flags (or a list of flag strings, parsed here)."""
        if not isinstance(args, argparse.Namespace):
            parser = argparse.ArgumentParser(prog="graph-config", add_help=False)
            cls.add_arguments(parser)
            args = parser.parse_args(list(args))
        data: dict[str, dict[str, Any]] = {}
        if args.graph_config:
            data = json.loads(args.graph_config) if _looks_like_json(args.graph_config) else {}
            if not data:
                raise ValueError(f"--graph-config must be a JSON object, got {args.graph_config!r}")
            cls.from_dict(data)  # report config errors before flag overrides are merged in
            data = {phase: dict(settings) for phase, settings in data.items()}
        for phase in PHASES:
            overrides = data.setdefault(phase, {})
            for flag, key in (("mode", "mode"), ("compiler", "compiler")):
                value = getattr(args, f"graph_{flag}_{phase}")
                if value is not None:
                    overrides[key] = value
            buckets = getattr(args, f"graph_buckets_{phase}")
            if buckets is not None:
                overrides["buckets"] = _parse_buckets(buckets, f"--graph-buckets-{phase}")
        for flag, phase, key in (
            ("graph_max_bs", "decode", "max_bs"),
            ("graph_max_tokens", "prefill", "max_tokens"),
            ("graph_max_requests", "prefill", "max_requests"),
        ):
            value = getattr(args, flag)
            if value is not None:
                data[phase][key] = value
        return cls.from_dict(data)


def _phase_from_dict(phase: str, settings: Any) -> PhaseConfig:
    config_type = PHASES[phase]
    if not isinstance(settings, Mapping):
        raise ValueError(f"{phase}: settings must be a mapping of field -> value, got {settings!r}")
    allowed = [f.name for f in fields(config_type)]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{phase}: unknown setting(s) {', '.join(map(repr, unknown))}; {phase} settings: {', '.join(allowed)}")
    return config_type(**settings)


def _parse_buckets(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers like 1,2,4,8; got {text!r}") from None


def _looks_like_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--graph-config is not valid JSON: {exc}") from exc
