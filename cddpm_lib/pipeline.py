"""The papermill DAG that regenerates the paper: data → preprocessing → SSL → training → evaluation → report.

Each node is one executed notebook (one per stage, per fold, per model) with parameters from the profile
(``profiles/<stage>.yaml``) plus the node's own (model, weighting, fold). Executed copies go to
``runs/<profile>/notebooks/``. A node whose executed notebook exists, finished, and ran with the same parameters
(recorded in a ``.done.json`` beside it) is skipped, unless a dependency ran after it — so a rerun after an
interruption continues where it stopped. A failing notebook stops the pipeline with its name, the cell and the
error; its executed copy (with the traceback) stays for inspection and earlier results are kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import paths
from .config import ConfigError, load_stage_profiles, profile_params
from .datasets import model_id
from .volumes import save_json

KERNEL_NAME = os.environ.get("CDDPM_KERNEL", "cddpm-uad")

#: stage name -> notebook file (stages run in this order)
STAGE_NOTEBOOKS: dict[str, str] = {
    "data": "00_data.ipynb",
    "preprocessing": "01_preprocessing.ipynb",
    "ssl": "02_ssl_pretraining.ipynb",
    "training": "03_training.ipynb",
    "reconstruction_quality": "04_reconstruction_quality.ipynb",
    "domain_shift": "05_domain_shift.ipynb",
    "segmentation": "06_segmentation.ipynb",
    "postprocessing_ablation": "07_postprocessing_ablation.ipynb",
}
STAGES: tuple[str, ...] = (*STAGE_NOTEBOOKS, "report")
#: stages whose single run goes alone, on every core: data and preprocessing (nothing else can run yet) and the
#: evaluation stages, which share the cached reconstructions (in order, each reuses what the one before saved)
EXCLUSIVE_STAGES: frozenset[str] = frozenset(
    {"data", "preprocessing", "reconstruction_quality", "domain_shift", "segmentation", "postprocessing_ablation"})


class PipelineError(RuntimeError):
    """A node failed; the message names the notebook, the cell and the error."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One notebook run of the DAG."""

    key: str  # unique, e.g. "training/cddpm-ssl_t2/fold0"
    stage: str
    notebook: str  # file name in notebooks/
    parameters: dict[str, Any]
    deps: tuple[str, ...] = ()

    @property
    def exclusive(self) -> bool:
        """Runs alone with all CPU cores (:data:`EXCLUSIVE_STAGES`)."""
        return self.stage in EXCLUSIVE_STAGES

    @property
    def label(self) -> str:
        return self.key.replace("/", " ")

    def output_path(self, profile: str) -> Path:
        return paths.notebooks_out_dir(profile) / (self.key.replace("/", "__") + ".ipynb")

    def params_hash(self) -> str:
        blob = json.dumps({"notebook": self.notebook, "parameters": self.parameters}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Building the DAG from the profile


def pipeline_settings(profile: str) -> dict[str, Any]:
    """Which models, weightings and folds a profile runs (``profiles/pipeline.yaml``)."""
    settings = profile_params("pipeline", profile)
    required = {"models", "weightings", "folds", "ssl_models", "source"}
    missing = required - set(settings)
    if missing:
        raise ConfigError(f"profiles/pipeline.yaml: profile {profile!r} lacks {sorted(missing)}")
    return settings


def merge_override(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``; mappings merge key by key, at every depth (``--set
    'training.model_hparams={cddpm: {encoder_norm: batch}}'`` changes that one hyper-parameter and keeps the
    profile's others), anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge_override(base.get(k), v) for k, v in override.items()}}
    return override


def _params(stage: str, profile: str, overrides: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    params = {"profile": profile, **profile_params(stage, profile), **extra}
    for k, v in overrides.get(stage, {}).items():
        params[k] = merge_override(params.get(k), v)
    return params


def check_override_stages(overrides: dict[str, dict[str, Any]]) -> None:
    """Every ``--set STAGE.PARAM=VALUE`` must name a stage with a notebook: a misspelt stage
    (``trainig.max_steps``) would otherwise match no node and be dropped without a word, and the run would go on
    with the profile's value. (Unknown parameter names are caught per notebook by :func:`check_parameters`.)"""
    unknown = sorted(set(overrides) - set(STAGE_NOTEBOOKS))
    if unknown:
        raise ConfigError(f"--set: unknown stage(s) {unknown}; parameters can be set for the stages "
                          f"{', '.join(STAGE_NOTEBOOKS)} (as STAGE.PARAM=VALUE, e.g. training.max_steps=200)")


def build_dag(profile: str, overrides: dict[str, dict[str, Any]] | None = None) -> list[Node]:
    """All nodes for ``profile`` in a valid execution order.

    ``overrides``: ``{stage: {param: value}}`` applied on top of the profile (command line ``--set``); a stage
    without a notebook is a :class:`ConfigError` (:func:`check_override_stages`).
    """
    overrides = overrides or {}
    check_override_stages(overrides)
    s = pipeline_settings(profile)
    source = s["source"]
    nodes: list[Node] = []
    add = nodes.append
    add(Node("data", "data", STAGE_NOTEBOOKS["data"], _params("data", profile, overrides, source=source)))
    add(Node("preprocessing", "preprocessing", STAGE_NOTEBOOKS["preprocessing"],
             _params("preprocessing", profile, overrides, source=source), ("data",)))
    train_keys: list[str] = []
    for w in s["weightings"]:
        for k in s["folds"]:
            ssl_key = ""
            if s["ssl_models"]:
                ssl_key = f"ssl/spark_{w}/fold{k}"
                add(Node(ssl_key, "ssl", STAGE_NOTEBOOKS["ssl"],
                         _params("ssl", profile, overrides, source=source, weighting=w, fold=k), ("preprocessing",)))
            variants = [(m, False) for m in s["models"]] + [(m, True) for m in s["ssl_models"]]
            for m, ssl in variants:
                key = f"training/{model_id(m, w, ssl)}/fold{k}"
                deps = ("preprocessing", ssl_key) if ssl else ("preprocessing",)
                add(Node(key, "training", STAGE_NOTEBOOKS["training"],
                         _params("training", profile, overrides, source=source, model=m, weighting=w,
                                 fold=k, ssl=ssl), deps))
                train_keys.append(key)
    ssl_keys = [n.key for n in nodes if n.stage == "ssl"]
    for stage in ("reconstruction_quality", "domain_shift", "segmentation"):
        add(Node(stage, stage, STAGE_NOTEBOOKS[stage], _params(stage, profile, overrides, source=source),
                 tuple(train_keys + ssl_keys)))
    add(Node("postprocessing_ablation", "postprocessing_ablation", STAGE_NOTEBOOKS["postprocessing_ablation"],
             _params("postprocessing_ablation", profile, overrides, source=source), ("segmentation",)))
    return nodes


def notebook_parameters(notebook: Path) -> dict[str, Any]:
    """Names (and inferred defaults) of a notebook's ``parameters`` cell, via papermill's inspection."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def check_parameters(nodes: Iterable[Node], notebooks_dir: Path) -> None:
    """Every parameter passed to a notebook must exist in its ``parameters`` cell (papermill only warns)."""
    cache: dict[str, set[str]] = {}
    problems = []
    for node in nodes:
        if node.notebook not in cache:
            path = notebooks_dir / node.notebook
            if not path.exists():
                raise PipelineError(f"notebook {path} does not exist (stage {node.stage!r})")
            cache[node.notebook] = set(notebook_parameters(path))
        unknown = sorted(set(node.parameters) - cache[node.notebook])
        if unknown:
            problems.append(f"{node.notebook}: unknown parameter(s) {unknown} (from stage {node.stage!r}); "
                            f"the notebook accepts {sorted(cache[node.notebook])}")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


#: stage -> "module:ConfigClass" of the stage's settings (the class its notebook builds from its parameters)
STAGE_CONFIGS: dict[str, str] = {
    "data": "cddpm_lib.manifests:DataConfig",
    "preprocessing": "cddpm_lib.preprocessing:PreprocessConfig",
    "ssl": "cddpm_lib.spark:SSLConfig",
    "training": "cddpm_lib.train:TrainConfig",
    "reconstruction_quality": "cddpm_lib.quality:ReconstructionQualityConfig",
    "domain_shift": "cddpm_lib.histograms:DomainShiftConfig",
    "segmentation": "cddpm_lib.segmentation:SegmentationConfig",
    "postprocessing_ablation": "cddpm_lib.ablation:PostprocessingAblationConfig",
}


# Stages that reconstruct the same test volumes with the same models and share the files (reconstruct.recon_key),
# and the settings that are part of that key: differing values make each stage reconstruct on its own.
SHARED_RECONSTRUCTION_STAGES = ("reconstruction_quality", "domain_shift", "segmentation")
SHARED_RECONSTRUCTION_SETTINGS = ("seed", "amp")


def check_values(nodes: Iterable[Node]) -> list[str]:
    """Build every node's stage configuration from its parameters before anything runs, so that a bad value
    (``--set ssl.max_steps=abc``) stops the run at once, with the stage and parameter named, instead of when its
    notebook starts, possibly hours later.

    Returns warnings (the run goes on): :data:`SHARED_RECONSTRUCTION_SETTINGS` that differ between the
    :data:`SHARED_RECONSTRUCTION_STAGES`, whose reconstructions are then neither shared nor of the same noise and
    precision (e.g. ``--set segmentation.amp=bf16`` alone; ``amp`` compared as it will run on the stage's device,
    :func:`runtime.effective_amp`)."""
    import importlib

    from .runtime import default_device, effective_amp

    problems: dict[str, list[str]] = {}  # message -> runs it concerns
    shared: dict[str, dict[str, Any]] = {}  # setting -> {stage: value}
    for node in nodes:
        if node.stage not in STAGE_CONFIGS:
            continue
        module, name = STAGE_CONFIGS[node.stage].split(":")
        try:
            cfg = getattr(importlib.import_module(module), name).from_namespace(node.parameters)
            device = default_device(cfg.device) if hasattr(cfg, "device") else None
        except (ConfigError, ValueError, TypeError) as exc:
            problems.setdefault(f"stage {node.stage!r}: {exc}", []).append(node.key)
            continue
        if node.stage in SHARED_RECONSTRUCTION_STAGES:
            for setting in SHARED_RECONSTRUCTION_SETTINGS:
                value = getattr(cfg, setting)
                if setting == "amp":  # the precision that will run: bf16 falling back to float32 is float32
                    value = effective_amp(value, device)[0]
                shared.setdefault(setting, {})[node.stage] = value
    if problems:
        lines = [f"  {msg} ({keys[0]}" + (f" and {len(keys) - 1} more run(s))" if len(keys) > 1 else ")")
                 for msg, keys in problems.items()]
        raise ConfigError("invalid parameter value(s):\n" + "\n".join(lines))
    return [f"{setting} differs between stages ({', '.join(f'{st}.{setting}={v!r}' for st, v in values.items())}): "
            "they reconstruct the same test volumes, which are then not shared and not alike; set it for all "
            "three stages" for setting, values in shared.items() if len(set(values.values())) > 1]


# --------------------------------------------------------------------------------------------------------------
# Skip-if-done bookkeeping


def _done_path(node: Node, profile: str) -> Path:
    return node.output_path(profile).with_suffix(".done.json")


def done_record(node: Node, profile: str) -> dict[str, Any] | None:
    path = _done_path(node, profile)
    if not path.exists() or not node.output_path(profile).exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_up_to_date(node: Node, profile: str, finished: dict[str, float]) -> bool:
    """Done with the same parameters and newer than every dependency's completion."""
    rec = done_record(node, profile)
    if rec is None or rec.get("params_hash") != node.params_hash():
        return False
    return all(finished.get(d, 0.0) <= rec.get("finished", 0.0) for d in node.deps)


# --------------------------------------------------------------------------------------------------------------
# Execution


def _kernel_manager_class(threads: int | None):
    """nbclient's kernel manager, launching the kernel with ``OMP_NUM_THREADS=threads`` (torch reads it at start-up)
    in the kernel's own environment: runs side by side each get their own setting, ``os.environ`` is untouched."""
    from jupyter_client.manager import AsyncKernelManager

    if threads is None:
        return AsyncKernelManager

    class ThreadsKernelManager(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw):
            kw["env"] = {**(kw.get("env") or os.environ), "OMP_NUM_THREADS": str(threads)}
            return await super()._async_pre_start_kernel(**kw)

    return ThreadsKernelManager


def execute_node(node: Node, profile: str, notebooks_dir: Path, kernel_name: str = KERNEL_NAME,
                 threads: int | None = None) -> float:
    """Run one notebook with papermill (its kernel on ``threads`` CPU threads; None: the environment's setting);
    returns wall seconds. Raises :class:`PipelineError` on failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = node.output_path(profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    _done_path(node, profile).unlink(missing_ok=True)
    t0 = time.time()
    try:
        papermill.execute_notebook(
            str(notebooks_dir / node.notebook), str(out), parameters=node.parameters, kernel_name=kernel_name,
            cwd=str(notebooks_dir), progress_bar=False, log_output=False,
            kernel_manager_class=_kernel_manager_class(threads),
        )
    except PapermillExecutionError as exc:
        raise PipelineError(
            f"{node.notebook} ({node.label}) failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"executed copy with the traceback: {out}"
        ) from None
    except Exception as exc:
        raise PipelineError(f"{node.notebook} ({node.label}) could not run: {type(exc).__name__}: {exc}") from exc
    seconds = time.time() - t0
    save_json({"params_hash": node.params_hash(), "parameters": node.parameters, "seconds": seconds,
               "finished": time.time(), "notebook": node.notebook}, _done_path(node, profile))
    return seconds


def _select(nodes: Sequence[Node], only: Sequence[str] | None) -> list[Node]:
    if not only:
        return list(nodes)
    unknown = sorted(set(only) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    return [n for n in nodes if n.stage in only]


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """CPU threads each notebook kernel gets when ``jobs`` run side by side: the cores shared out evenly
    (at least one). Small 2D convolutions scale poorly over threads, so on a 2-core CPU two one-thread runs
    side by side train ~1.4x more slices per second than one run on two threads (BENCHMARKS.md)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def node_threads(node: Node, jobs: int, cores: int | None = None) -> int | None:
    """CPU threads for ``node``'s kernel: every core for an exclusive node, :func:`threads_per_job` otherwise;
    None (the kernel inherits it) when the user set ``OMP_NUM_THREADS``."""
    return _threads(1 if node.exclusive else jobs, cores)


def _threads(jobs: int, cores: int | None = None) -> int | None:
    return None if "OMP_NUM_THREADS" in os.environ else threads_per_job(jobs, cores)


def run_pipeline(
    profile: str,
    *,
    jobs: int = 1,
    force: Sequence[str] = (),
    only: Sequence[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    notebooks_dir: Path | None = None,
    kernel_name: str = KERNEL_NAME,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) the DAG of ``profile``; returns ``{key: {"status", "seconds"}}``.

    ``force``: stages to rerun even when up to date (their dependants rerun too, being newer).
    ``only``: restrict to these stages (their dependencies must already be done).
    ``jobs``: training and SSL runs side by side, each kernel with :func:`threads_per_job` CPU threads; the
    other stages run one at a time on all cores (:data:`EXCLUSIVE_STAGES`).
    """
    paths.check_profile(profile)
    if int(jobs) < 1:
        raise ConfigError(f"--jobs must be at least 1 (runs side by side), got {jobs}")
    notebooks_dir = Path(notebooks_dir or paths.repo_root() / "notebooks")
    for stage in force:
        if stage not in STAGES:
            raise ConfigError(f"--force: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    all_nodes = build_dag(profile, overrides)
    check_parameters(all_nodes, notebooks_dir)
    for warning in check_values(all_nodes):
        log(f"[pipeline] warning: {warning}")
    nodes = _select(all_nodes, only)
    selected = {n.key for n in nodes}

    finished: dict[str, float] = {}
    for n in all_nodes:
        rec = done_record(n, profile)
        if rec is not None and n.stage not in force:
            finished[n.key] = rec.get("finished", 0.0)
    status: dict[str, dict[str, Any]] = {}
    pending = [n for n in nodes]
    todo = [n for n in pending if n.stage in force or not is_up_to_date(n, profile, finished)]
    todo_keys = {n.key for n in todo}
    for n in pending:
        if n.key not in todo_keys:
            status[n.key] = {"status": "skipped (up to date)", "seconds": 0.0}
    # a node downstream of a node that will run must run as well
    changed = True
    while changed:
        changed = False
        for n in pending:
            if n.key not in todo_keys and any(d in todo_keys for d in n.deps):
                todo.append(n)
                todo_keys.add(n.key)
                status.pop(n.key, None)
                changed = True
    todo.sort(key=lambda n: [x.key for x in all_nodes].index(n.key))
    for n in todo:
        missing = [d for d in n.deps if d not in selected and d not in finished]
        if missing:
            raise PipelineError(f"{n.label} needs {missing} to have run first (run without --only, or run them)")

    total = len(todo)
    log(f"[pipeline] profile={profile}: {len(pending)} runs, {total} to execute, {len(pending) - total} up to date"
        f"; training/SSL {jobs} at a time on {_threads_text(jobs)} CPU thread(s) each, the other stages one at a "
        f"time on {_threads_text(1)} CPU thread(s)")
    t_start = time.time()
    done_count = 0
    running: dict[Future, Node] = {}
    remaining = list(todo)
    durations: list[float] = []
    failure: PipelineError | None = None
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while (remaining or running) and failure is None:
            ready = [n for n in remaining if all(d not in todo_keys or d in finished for d in n.deps)
                     and all(d not in [r.key for r in running.values()] for d in n.deps)]
            while ready and len(running) < max(1, jobs) and not any(r.exclusive for r in running.values()):
                if ready[0].exclusive and running:
                    break  # an exclusive node waits until the machine is free
                node = ready.pop(0)
                remaining.remove(node)
                log(f"[pipeline] start  {node.label}")
                running[pool.submit(execute_node, node, profile, notebooks_dir, kernel_name,
                                    node_threads(node, jobs))] = node
            if not running:
                raise PipelineError("no runnable node left: dependency cycle or failed dependency")
            finished_futures, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished_futures:
                node = running.pop(fut)
                try:
                    seconds = fut.result()
                except PipelineError as exc:
                    status[node.key] = {"status": "failed", "seconds": 0.0, "error": str(exc)}
                    failure = exc
                    continue
                done_count += 1
                durations.append(seconds)
                finished[node.key] = time.time()
                status[node.key] = {"status": "ran", "seconds": seconds}
                elapsed = time.time() - t_start
                eta = (elapsed / done_count) * (total - done_count) / max(1, jobs) if done_count else 0
                log(f"[pipeline] done   {node.label} in {seconds:.0f}s  ({done_count}/{total}, "
                    f"elapsed {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left)")
    _write_log(profile, status, all_nodes)
    if failure is not None:
        raise failure
    if report and (only is None or "report" in only):
        from .report import build_report

        t0 = time.time()
        path = build_report(profile)
        status["report"] = {"status": "ran", "seconds": time.time() - t0}
        _write_log(profile, status, all_nodes)
        log(f"[pipeline] report {path}")
    log(f"[pipeline] finished in {(time.time() - t_start) / 60:.1f} min")
    return status


def _threads_text(jobs: int) -> str:
    n = _threads(jobs)
    return os.environ["OMP_NUM_THREADS"] if n is None else str(n)


def _write_log(profile: str, status: dict[str, dict[str, Any]], nodes: Sequence[Node]) -> None:
    """``runs/<profile>/pipeline_log.json``: per node status, wall time, stage (read by the report)."""
    path = paths.run_dir(profile) / "pipeline_log.json"
    previous: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text()).get("nodes", {})
        except (OSError, json.JSONDecodeError):
            previous = {}
    stage_of = {n.key: n.stage for n in nodes}
    merged = dict(previous)
    for key, st in status.items():
        rec = done_record(next(n for n in nodes if n.key == key), profile) if key in stage_of else None
        if not (st["status"].startswith("skipped") and key in previous):  # a skipped run keeps its entry
            merged[key] = {**st, "stage": stage_of.get(key, key),
                           "seconds": st["seconds"] or (rec or {}).get("seconds", 0.0)}
        if rec is not None and "finished" in rec:
            merged[key]["finished"] = rec["finished"]  # epoch seconds; with "seconds", the run's span
    save_json({"profile": profile, "nodes": merged, "written": time.time()}, path)


def stage_profiles_consistent() -> list[str]:
    """Profile names missing from any stage's YAML (an empty list when every stage defines every profile)."""
    problems = []
    for stage in [*STAGE_NOTEBOOKS, "pipeline"]:
        try:
            defined = set(load_stage_profiles(stage))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        for p in paths.PROFILES:
            if p not in defined:
                problems.append(f"profiles/{stage}.yaml lacks profile {p!r}")
    return problems
