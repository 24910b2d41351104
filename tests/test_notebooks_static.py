"""Notebooks: numbered, committed without outputs, no logic, parameters cell first, config cell next."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cddpm_lib.paths import repo_root
from cddpm_lib import pipeline
from cddpm_lib.pipeline import STAGE_NOTEBOOKS

NB_DIR = repo_root() / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _src(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def test_every_stage_has_its_notebook():
    assert sorted(p.name for p in NOTEBOOKS) == sorted(STAGE_NOTEBOOKS.values())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_functions_or_classes(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse(_src(cell))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                            ast.Lambda))]
        assert not defs, f"{path.name} cell {i} defines logic; move it into cddpm_lib"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_parameters_and_config_cells(path):
    cells = _cells(path)
    assert cells[0]["cell_type"] == "markdown" and _src(cells[0]).lstrip().startswith("# ")
    assert "§" in _src(cells[0]) or "section" in _src(cells[0]).lower(), "title cell must cite the paper section"
    code = [c for c in cells if c["cell_type"] == "code"]
    params = code[0]
    assert "parameters" in params.get("metadata", {}).get("tags", []), "first code cell must be tagged parameters"
    tree = ast.parse(_src(params))
    names = []
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"parameters cell holds assignments only: {ast.dump(node)[:60]}"
        ast.literal_eval(node.value)  # literals only
        names += [t.id for t in node.targets]
    assert "profile" in names and "source" in names
    # papermill parses each line with a regex and silently drops what it cannot read (e.g. "=" in a comment)
    seen = set(pipeline.notebook_parameters(path))
    assert set(names) <= seen, f"{path.name}: papermill cannot read parameter(s) {sorted(set(names) - seen)}"
    for line in _src(params).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"{path.name}: parameter line without a comment: {line!r}"
    assert "from_namespace(globals())" in _src(code[1]) or "from_params(" in _src(code[1])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_stay_thin(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code" or "parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        tree = ast.parse(_src(cell))
        loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.If, ast.Try, ast.With))]
        assert not loops, f"{path.name} cell {i}: control flow belongs in cddpm_lib"
        assert len(tree.body) <= 6, f"{path.name} cell {i}: {len(tree.body)} statements; keep cells to 1–3 calls"


def _stage_configs():
    from cddpm_lib.ablation import PostprocessingAblationConfig
    from cddpm_lib.histograms import DomainShiftConfig
    from cddpm_lib.manifests import DataConfig
    from cddpm_lib.preprocessing import PreprocessConfig
    from cddpm_lib.quality import ReconstructionQualityConfig
    from cddpm_lib.segmentation import SegmentationConfig
    from cddpm_lib.spark import SSLConfig
    from cddpm_lib.train import TrainConfig

    return [DataConfig, PreprocessConfig, SSLConfig, TrainConfig, ReconstructionQualityConfig, DomainShiftConfig,
            SegmentationConfig, PostprocessingAblationConfig]


@pytest.mark.parametrize("config", _stage_configs(), ids=lambda c: c.STAGE)
def test_notebook_opened_by_hand_runs_the_profile_it_names(config):
    """In JupyterLab nothing injects the profile: every parameter a profile sets is None in the notebook, so the
    config cell takes the named profile's value (and the paper's literal otherwise); typed values win."""
    from cddpm_lib.config import load_stage_profiles, profile_params

    path = NB_DIR / STAGE_NOTEBOOKS[config.STAGE]
    cell = next(c for c in _cells(path) if c["cell_type"] == "code")
    literals = {t.id: ast.literal_eval(n.value) for n in ast.parse(_src(cell)).body for t in n.targets}
    literals.pop("n_examples", None)  # the notebook's own display setting, not the stage's
    assert set(literals) <= set(config.field_names()), path.name
    set_by_profiles = {k for params in load_stage_profiles(config.STAGE).values() for k in (params or {})
                       if k in config.field_names()}  # others (n_examples) are the notebook's own display settings
    assert literals["source"] is None and all(literals[k] is None for k in set_by_profiles), \
        f"{path.name}: {sorted(k for k in set_by_profiles if literals[k] is not None)} must be None"
    for profile in ("smoke", "quick", "paper"):
        built = config.from_namespace({**literals, "profile": profile})
        from_profile = {k: v for k, v in profile_params(config.STAGE, profile).items() if k in config.field_names()}
        source = profile_params("pipeline", profile)["source"]  # the data the pipeline runs this profile on
        expected = config.from_params({**{k: v for k, v in literals.items() if v is not None}, **from_profile,
                                       "profile": profile, "source": source})
        assert built == expected, (path.name, profile)
    for typed, value in (("max_steps", 3), ("folds", [0])):
        if typed in set_by_profiles:
            assert getattr(config.from_namespace({**literals, "profile": "quick", typed: value}), typed) in (3, (0,))
