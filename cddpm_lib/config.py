"""Stage configuration: one frozen dataclass per stage, profiles, strict validation.

Each stage module defines its own ``@dataclass(frozen=True) class XConfig(StageConfig)`` whose defaults are
the paper's settings. A notebook's ``parameters`` cell holds literals; the next cell builds the config with
``XConfig.from_namespace(globals())`` (or ``from_params``), which type-checks every field.

Profiles live in ``cddpm_lib/profiles/<stage>.yaml``; each file maps a profile name (``smoke``, ``quick``,
``paper``) to the parameter overrides of that stage's notebook. ``profile_params(stage, profile)`` reads them
and rejects an unknown profile; the pipeline checks the names against the notebook's parameters cell.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
#: mixed precisions a stage can ask for: float32 (``none``), bfloat16 and float16 autocast (``runtime.effective_amp``)
AMPS = ("none", "bf16", "fp16")
#: a decimal number as text, e.g. "1e-4", which YAML 1.1 leaves a string
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """A parameter is unknown, missing or of the wrong type; the message names it."""


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Validate (and lightly coerce: int->float, list->tuple) ``value`` against ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"parameter {name!r}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"parameter {name!r}: expected None, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"parameter {name!r}: {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"parameter {name!r}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"parameter {name!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"parameter {name!r}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter {name!r}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"parameter {name!r}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"parameter {name!r}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"parameter {name!r}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"parameter {name!r}: expected {annotation.__name__}, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage's config. Subclasses are ``@dataclass(frozen=True)`` with annotated fields."""

    #: the stage whose ``profiles/<STAGE>.yaml`` resolves parameters left at ``None`` (:meth:`from_namespace`)
    STAGE: typing.ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise :class:`ConfigError` naming the parameter."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]):
        """Build from a mapping; an unknown key is an error naming it and listing the known ones."""
        known = set(cls.field_names())
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown parameter(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**dict(params))

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]):
        """Build from a notebook's globals: picks exactly this config's field names (missing ones keep defaults).

        With a :attr:`STAGE`, a parameter left at ``None`` (or absent) takes the value the namespace's ``profile``
        gives it in ``profiles/<STAGE>.yaml`` (``source``: ``profiles/pipeline.yaml``'s), else the default (the
        paper's). So a notebook opened in JupyterLab runs the profile it names; the pipeline passes every value
        explicitly, and a value typed into the cell wins.
        """
        given = {k: namespace[k] for k in cls.field_names() if k in namespace}
        if cls.STAGE is None:
            return cls(**given)
        from .paths import check_profile

        profile = given.get("profile") or next(f.default for f in dataclasses.fields(cls) if f.name == "profile")
        if not isinstance(profile, str):
            raise ConfigError(f"parameter 'profile': expected a profile name, got {profile!r}")
        fields = set(cls.field_names())  # a profile may also set the notebook's own display parameters
        from_profile = {k: v for k, v in profile_params(cls.STAGE, check_profile(profile)).items() if k in fields}
        if "source" in fields and "source" not in from_profile:  # the data source is the pipeline's, per profile
            from_profile["source"] = profile_params("pipeline", profile)["source"]
        return cls.from_params({**from_profile, **{k: v for k, v in given.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def load_stage_profiles(stage: str) -> dict[str, dict[str, Any]]:
    """All profiles of one stage: ``{profile: {param: value}}`` from ``profiles/<stage>.yaml``."""
    path = PROFILE_DIR / f"{stage}.yaml"
    if not path.exists():
        raise ConfigError(f"no profile file for stage {stage!r} at {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of profile -> parameters")
    return data


def profile_params(stage: str, profile: str) -> dict[str, Any]:
    """Parameters of ``stage`` under ``profile`` (``{}`` when the profile only keeps the defaults)."""
    data = load_stage_profiles(stage)
    if profile not in data:
        raise ConfigError(f"profile {profile!r} not defined for stage {stage!r}; defined: {sorted(data)}")
    params = data[profile] or {}
    if not isinstance(params, dict):
        raise ConfigError(f"profiles/{stage}.yaml: profile {profile!r} must be a mapping")
    return dict(params)
