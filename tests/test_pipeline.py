"""pipeline: DAG construction, parameter checking, skip-if-done, failure reporting (fake notebooks)."""
from __future__ import annotations

import json
import time

import nbformat
import pytest

from cddpm_lib import pipeline
from cddpm_lib.config import ConfigError

SETTINGS = {"source": "synthetic", "weightings": ["t2"], "folds": [0], "models": ["ddpm"], "ssl_models": []}


def _fake_notebook(path, params: dict, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "cddpm-uad", "display_name": "Python (cddpm-uad)", "language": "python"}
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# fake"), cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


@pytest.fixture()
def fake_env(tmp_path, monkeypatch):
    """Fake notebooks for every stage that append their key to a log and can be told to fail."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    log = tmp_path / "log.txt"
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    stage_params = {s: {"steps": 1} for s in pipeline.STAGE_NOTEBOOKS}

    def fake_profile_params(stage, profile):
        return dict(SETTINGS) if stage == "pipeline" else dict(stage_params[stage])

    monkeypatch.setattr(pipeline, "profile_params", fake_profile_params)
    for stage, name in pipeline.STAGE_NOTEBOOKS.items():
        params = {"profile": "smoke", "source": "synthetic", "steps": 1, "fail": False}
        if stage in ("training", "ssl"):
            params.update(model="ddpm", weighting="t2", fold=0, ssl=False)
        body = (f"open({str(log)!r}, 'a').write('{stage}\\n')\n"
                f"import os; open({str(log) + '.threads'!r}, 'a').write(os.environ.get('OMP_NUM_THREADS', '-') + ' ')\n"
                "if fail: raise ValueError('planted failure')")
        _fake_notebook(nb_dir / name, params, body)
    return nb_dir, log, stage_params


def test_dag_quick_profile_shape():
    nodes = pipeline.build_dag("quick")
    keys = [n.key for n in nodes]
    s = pipeline.pipeline_settings("quick")
    n_train = len(s["weightings"]) * len(s["folds"]) * (len(s["models"]) + len(s["ssl_models"]))
    assert sum(n.stage == "training" for n in nodes) == n_train
    assert keys.index("data") < keys.index("preprocessing") < keys.index("segmentation")
    cddpm_ssl = next(n for n in nodes if n.key == "training/cddpm-ssl_t2/fold0")
    assert "ssl/spark_t2/fold0" in cddpm_ssl.deps and cddpm_ssl.parameters["ssl"] is True
    # every dependency appears before its dependant
    pos = {k: i for i, k in enumerate(keys)}
    assert all(pos[d] < pos[n.key] for n in nodes for d in n.deps)


def test_every_stage_defines_every_profile():
    assert pipeline.stage_profiles_consistent() == []


def test_profiles_match_notebook_parameters():
    for profile in ("smoke", "quick", "paper"):
        pipeline.check_parameters(pipeline.build_dag(profile), pipeline.paths.repo_root() / "notebooks")


def test_unknown_parameter_is_an_error(fake_env):
    nb_dir, _, stage_params = fake_env
    stage_params["training"]["stpes"] = 3
    with pytest.raises(ConfigError, match=r"03_training.ipynb: unknown parameter\(s\) \['stpes'\]"):
        pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, log=lambda m: None)


def test_runs_skips_and_forces(fake_env):
    nb_dir, log, stage_params = fake_env
    status = pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, log=lambda m: None)
    assert all(v["status"] == "ran" for v in status.values())
    first = log.read_text().split()
    assert first[0] == "data" and len(first) == 7
    # second run: everything up to date
    status = pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, log=lambda m: None)
    assert all(v["status"].startswith("skipped") for v in status.values())
    assert len(log.read_text().split()) == 7
    # forcing a stage reruns it and everything downstream of it
    pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, force=["segmentation"], log=lambda m: None)
    assert log.read_text().split()[7:] == ["segmentation", "postprocessing_ablation"]
    # a changed parameter reruns that node (and its dependants)
    stage_params["domain_shift"]["steps"] = 2
    pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, log=lambda m: None)
    assert log.read_text().split()[9:] == ["domain_shift"]
    logged = json.loads((pipeline.paths.run_dir("smoke") / "pipeline_log.json").read_text())
    node = logged["nodes"]["training/ddpm_t2/fold0"]
    assert node["stage"] == "training" and node["finished"] > node["seconds"] > 0


def _threads_by_stage(log) -> dict[str, set[str]]:
    stages = log.read_text().split()
    threads = (log.parent / "log.txt.threads").read_text().split()
    out: dict[str, set[str]] = {}
    for stage, n in zip(stages, threads):
        out.setdefault(stage, set()).add(n)
    return out


def test_parallel_runs_share_the_cores(fake_env, monkeypatch):
    nb_dir, log, _ = fake_env
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 4)
    status = pipeline.run_pipeline("smoke", jobs=2, notebooks_dir=nb_dir, report=False, log=lambda m: None)
    assert all(v["status"] == "ran" for v in status.values())
    by_stage = _threads_by_stage(log)
    assert by_stage["training"] == {"2"}  # 4 cores / 2 jobs, in the kernel's environment
    assert by_stage["segmentation"] == {"4"} and by_stage["data"] == {"4"}  # exclusive stages: every core
    assert "OMP_NUM_THREADS" not in pipeline.os.environ  # the parent's environment is untouched
    assert pipeline.threads_per_job(3, cores=2) == 1 and pipeline.threads_per_job(1, cores=16) == 16


def test_exclusive_stages_run_alone(fake_env, monkeypatch):
    """Two folds of training run side by side; no evaluation stage overlaps another run."""
    nb_dir, log, _ = fake_env
    monkeypatch.setitem(SETTINGS, "folds", [0, 1])
    spans = []
    real = pipeline.execute_node

    def timed(node, *args, **kwargs):
        t0 = time.time()
        out = real(node, *args, **kwargs)
        spans.append((node, t0, time.time()))
        return out

    monkeypatch.setattr(pipeline, "execute_node", timed)
    pipeline.run_pipeline("smoke", jobs=2, notebooks_dir=nb_dir, report=False, log=lambda m: None)
    for node, a0, a1 in spans:
        overlapping = [m.key for m, b0, b1 in spans if m is not node and b0 < a1 and a0 < b1]
        if node.exclusive:
            assert not overlapping, (node.key, overlapping)
    train = [(a0, a1) for n, a0, a1 in spans if n.stage == "training"]
    assert len(train) == 2 and train[0][0] < train[1][1] and train[1][0] < train[0][1]  # side by side
    assert {n.stage for n, *_ in spans} >= {"segmentation", "reconstruction_quality", "domain_shift"}


def test_user_thread_setting_is_kept(fake_env, monkeypatch):
    nb_dir, log, _ = fake_env
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    pipeline.run_pipeline("smoke", jobs=2, notebooks_dir=nb_dir, report=False, log=lambda m: None)
    assert set((log.parent / "log.txt.threads").read_text().split()) == {"3"}


def test_failure_names_notebook_and_resumes(fake_env):
    nb_dir, log, stage_params = fake_env
    stage_params["training"]["fail"] = True
    with pytest.raises(pipeline.PipelineError, match=r"03_training.ipynb .*failed in cell .*planted failure"):
        pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, log=lambda m: None)
    out = pipeline.paths.notebooks_out_dir("smoke") / "training__ddpm_t2__fold0.ipynb"
    assert out.exists() and "planted failure" in out.read_text()
    assert log.read_text().split() == ["data", "preprocessing", "training"]
    # fixed: the rerun continues after the completed stages
    stage_params["training"]["fail"] = False
    pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, log=lambda m: None)
    assert log.read_text().split()[3:5] == ["training", "reconstruction_quality"]


def test_unknown_force_stage(fake_env):
    nb_dir, _, _ = fake_env
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, jobs=0, report=False)
    with pytest.raises(ConfigError, match="unknown stage 'trianing'"):
        pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, force=["trianing"], report=False)


def test_unknown_set_stage_is_an_error(fake_env):
    nb_dir, log, _ = fake_env
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['report', 'trainig'\]; .*training, "):
        pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, overrides={"trainig": {"steps": 5},
                                                                        "report": {"x": 1}},
                              report=False, log=lambda m: None)
    assert not log.exists()  # refused before any notebook ran
    nodes = pipeline.build_dag("smoke", {"training": {"steps": 5}})
    assert next(n for n in nodes if n.stage == "training").parameters["steps"] == 5


def test_bad_value_stops_the_run_before_any_notebook(fake_env):
    nb_dir, log, _ = fake_env
    _fake_notebook(nb_dir / pipeline.STAGE_NOTEBOOKS["training"], {"profile": "smoke", "source": "synthetic",
                   "steps": 1, "model": "ddpm", "weighting": "t2", "fold": 0, "ssl": False, "max_steps": 1},
                   f"open({str(log)!r}, 'a').write('training')")
    with pytest.raises(ConfigError, match=r"stage 'training': parameter 'max_steps': expected an integer, got str "
                                          r"'abc' \(training/ddpm_t2/fold0\)"):
        pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, overrides={"training": {"max_steps": "abc"}},
                              report=False, log=lambda m: None)
    assert not log.exists()


def test_mapping_overrides_change_only_the_keys_they_name():
    nodes = pipeline.build_dag("quick", {"training": {"model_hparams": {"cddpm": {"encoder_norm": "batch"}}}})
    hp = next(n for n in nodes if n.stage == "training").parameters["model_hparams"]
    profile = pipeline.profile_params("training", "quick")["model_hparams"]
    assert hp["cddpm"] == {**profile["cddpm"], "encoder_norm": "batch"}
    assert {k: v for k, v in hp.items() if k != "cddpm"} == {k: v for k, v in profile.items() if k != "cddpm"}
    assert pipeline.merge_override({"a": [1, 2], "b": {"c": 1}}, {"a": [3], "b": {"d": 2}}) == \
        {"a": [3], "b": {"c": 1, "d": 2}}  # lists and values replace, mappings merge


def test_malformed_set_value_names_the_item():
    from cddpm_lib.cli import _parse_set

    with pytest.raises(ConfigError, match=r"--set 'training.max_steps=\[1,': the value '\[1,' is not valid YAML"):
        _parse_set(["training.max_steps=[1,"])
    assert _parse_set(["training.lr=1e-4", "data.split=leak_free"]) == {"training": {"lr": "1e-4"},
                                                                         "data": {"split": "leak_free"}}


def test_stages_sharing_reconstructions_are_warned_of_differing_seed_or_amp(monkeypatch):
    from cddpm_lib import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)  # bf16 runs where asked: it differs
    assert pipeline.check_values(pipeline.build_dag("smoke")) == []
    warnings = pipeline.check_values(pipeline.build_dag("smoke", {"segmentation": {"amp": "bf16"},
                                                                  "domain_shift": {"seed": 3}}))
    assert len(warnings) == 2
    seed, amp = sorted(warnings, key=lambda w: not w.startswith("seed"))
    assert "domain_shift.seed=3" in seed and "segmentation.seed=0" in seed
    assert "segmentation.amp='bf16'" in amp and "reconstruction_quality.amp='none'" in amp


def test_amp_is_compared_as_it_will_run(monkeypatch):
    from cddpm_lib import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)  # bf16 asked for runs float32 here
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    assert pipeline.check_values(pipeline.build_dag("smoke", {"segmentation": {"amp": "bf16"}})) == []


def test_a_device_torch_does_not_know_stops_the_run_before_it_starts():
    with pytest.raises(ConfigError, match=r"stage 'segmentation': parameter 'device': 'gpu' is not a device"):
        pipeline.check_values(pipeline.build_dag("smoke", {"segmentation": {"device": "gpu"}}))


def test_run_pipeline_logs_the_value_warnings(fake_env, monkeypatch):
    nb_dir, _, _ = fake_env
    monkeypatch.setattr(pipeline, "check_values", lambda nodes: ["seed differs between stages (planted)"])
    said = []
    pipeline.run_pipeline("smoke", notebooks_dir=nb_dir, report=False, only=["data"], log=said.append)
    assert said[0] == "[pipeline] warning: seed differs between stages (planted)"
