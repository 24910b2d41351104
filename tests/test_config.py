"""config: strict stage dataclasses and profile files."""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from cddpm_lib import config
from cddpm_lib.config import ConfigError, StageConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig(StageConfig):
    lr: float = 1e-5
    steps: int = 10
    name: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    path: str | None = None
    flag: bool = False


def test_defaults_and_coercion():
    cfg = ToyConfig.from_params({"lr": 1, "sizes": [3, 4]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.sizes == (3, 4)
    # YAML 1.1 reads 1e-4 (no dot) as text; a float parameter takes it as the number it spells
    assert ToyConfig.from_params({"lr": yaml.safe_load("1e-4")}).lr == 1e-4
    assert ToyConfig.from_params({"lr": "-2.5E3"}).lr == -2500.0


def test_unknown_parameter_named():
    with pytest.raises(ConfigError, match="unknown parameter.*'stpes'"):
        ToyConfig.from_params({"stpes": 3})


@pytest.mark.parametrize("field,value", [("steps", 1.5), ("steps", True), ("name", "c"), ("flag", 1),
                                         ("sizes", [1, "x"]), ("path", 3), ("lr", "1e-4x"), ("lr", "fast"),
                                         ("steps", "10")])
def test_wrong_types_rejected_with_name(field, value):
    with pytest.raises(ConfigError, match=field):
        ToyConfig.from_params({field: value})


def test_from_namespace_picks_only_fields():
    ns = {"lr": 0.1, "unrelated": object(), "flag": True}
    cfg = ToyConfig.from_namespace(ns)
    assert cfg.lr == 0.1 and cfg.flag is True and cfg.steps == 10


def test_frozen():
    cfg = ToyConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 2.0  # type: ignore[misc]


def test_to_dict_roundtrip():
    cfg = ToyConfig(sizes=(5,), path="x")
    assert ToyConfig.from_params(cfg.to_dict()) == cfg


def test_profile_params_unknown_profile(tmp_path, monkeypatch):
    (tmp_path / "toy.yaml").write_text("smoke: {steps: 2}\nquick: {}\n")
    monkeypatch.setattr(config, "PROFILE_DIR", tmp_path)
    assert config.profile_params("toy", "smoke") == {"steps": 2}
    assert config.profile_params("toy", "quick") == {}
    with pytest.raises(ConfigError, match="'paper' not defined"):
        config.profile_params("toy", "paper")
    with pytest.raises(ConfigError, match="no profile file"):
        config.profile_params("nope", "smoke")
