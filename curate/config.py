"""Configs: YAML files and ``--set key=value`` overrides -> typed, frozen stage configs; pipelines.

Validation happens before any work starts and fails with one line naming the key. The resolved
config (every default filled in) is what the manifest records and what resume compares.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from curate.stage import Frozen, StageConfig


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line."""


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[x, y]"]`` -> ``{"a": {"b": 3}, "c": ["x", "y"]}``; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a mapping")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def describe(e: ValidationError, where: str) -> str:
    """First validation error as one line: ``where: key.path: message (got value)``."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "extra_forbidden" else f" (got {got!r})"
    more = len(e.errors()) - 1
    tail = f"; and {more} more problem{'s' if more > 1 else ''}" if more else ""
    return f"{where}: {loc}: {msg}{shown}{tail}"


def build(config_cls: type[StageConfig], data: dict[str, Any], where: str) -> StageConfig:
    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, where)) from None


def load_stage_config(
    config_cls: type[StageConfig],
    stage: str,
    config_file: str | None = None,
    inline: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> StageConfig:
    data: dict[str, Any] = {}
    if config_file:
        data = read_yaml(config_file)
    if inline:
        data = merge(data, inline)
    if sets:
        data = merge(data, parse_sets(sets))
    return build(config_cls, data, f"{stage} config")


def stage_and_config(
    stage: str,
    config_file: str | None = None,
    inline: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> tuple[type, StageConfig]:
    """The stage class for ``stage`` and its validated config; every problem is one ConfigError line."""
    from curate import stages

    try:
        cls = stages.get(stage)
    except stages.UnknownStage as e:
        raise ConfigError(str(e)) from None
    except ImportError as e:
        raise ConfigError(f"stage {stage!r} is not available: {e}") from None
    return cls, load_stage_config(cls.Config, stage, config_file, inline, sets)


def resolved(config: StageConfig) -> dict[str, Any]:
    """The config as plain JSON data, every default filled in. Resources are left out: they change
    where work runs, not what it produces, so resume must not depend on them."""
    return config.model_dump(mode="json", exclude={"resources"})


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- pipelines ---------------------------------------------------------------------------------
class PipelineStep(Frozen):
    stage: str
    name: str | None = None  # output directory name; defaults to the stage name
    input: str | None = None  # overrides "the previous step's output"
    config: dict[str, Any] = {}

    @property
    def dirname(self) -> str:
        return self.name or self.stage


class Pipeline(Frozen):
    name: str
    output: str
    input: str | None = None
    stages: list[PipelineStep]


def load_pipeline(path: str, sets: Sequence[str] = ()) -> Pipeline:
    data = read_yaml(path)
    try:
        pipe = Pipeline.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, path)) from None
    if not pipe.stages:
        raise ConfigError(f"{path}: the pipeline has no stages")
    names = [s.dirname for s in pipe.stages]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{path}: two steps write to the same directory {sorted(dup)[0]!r}; give one a name")
    # Relative paths in a pipeline file are relative to the directory it is run from.
    return pipe
