"""The HTML report of a run: reproduced vs paper tables, figures, provenance, wall times, executed notebooks.

``build_report(profile)`` reads only what the stages wrote under ``runs/<profile>/`` (results CSVs, figures,
``pipeline_log.json``, executed notebooks) and the data stage's ``data_info.json``; it never recomputes a number.
"""
from __future__ import annotations

import html
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import paths
from .volumes import save_text

#: results files shown first, in the paper's order, with their titles; any other CSV follows
KNOWN_RESULTS: tuple[tuple[str, str], ...] = (
    ("table2", "Table 2 — reconstruction quality (healthy test set) and l1-ratio"),
    ("table3", "Table 3 — segmentation performance (DICE, AUPRC)"),
    ("table4", "Table 4 — post-processing ablation (DICE)"),
    ("kld", "Fig. 3 — KL divergence of intensity histograms and DDPM/cDDPM ratios"),
    ("inference_time", "Inference time per volume and ratios"),
)
KNOWN_FIGURES: tuple[tuple[str, str], ...] = (
    ("fig2", "Fig. 2 — effect of the conditioning image"),
    ("fig3", "Fig. 3 — intensity histograms of input and reconstruction"),
    ("fig4", "Fig. 4 — input, reconstruction and anomaly map"),
    ("fig5", "Fig. 5 — DICE versus t_test"),
    ("fig6", "Fig. 6 — residual maps of all models"),
    ("table4", "Table 4 — post-processing deltas"),
)
PACKAGES = ("torch", "numpy", "scipy", "pandas", "torchio", "SimpleITK", "nibabel", "nilearn", "scikit-learn",
            "scikit-image", "mlxtend", "papermill", "deepbet", "cddpm-uad")

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right} th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left} img{max-width:100%;border:1px solid #ddd}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.5em 1em}
"""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _hardware() -> dict[str, str]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": str(os.cpu_count()), "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
        info["torch threads"] = str(torch.get_num_threads())
    except Exception:  # pragma: no cover - torch is a hard dependency
        info["gpu"] = "unknown"
    return info


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _data_info(profile: str, source: str | None) -> dict[str, Any]:
    sources = [source] if source else list(paths.SOURCES)
    for s in sources:
        p = paths.source_dir(s, profile) / "data_info.json"
        if p.exists():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                return {"data_info.json": f"unreadable at {p}"}
    return {"data": "no data_info.json found (data stage not run)"}


def _stage_times(log: dict[str, Any]) -> pd.DataFrame:
    """Per stage: runs, summed notebook seconds and, where the log has finish times, the wall-clock span from
    the first run's start to the last run's finish (shorter than the sum when runs went side by side)."""
    nodes = log.get("nodes", {})
    if not nodes:
        return pd.DataFrame(columns=["stage", "runs", "seconds", "wall seconds"])
    df = pd.DataFrame([{"stage": v.get("stage", k), "seconds": float(v.get("seconds", 0.0)),
                        "finished": float(v.get("finished", np.nan)), "status": v.get("status", "")}
                       for k, v in nodes.items()])
    df["started"] = df["finished"] - df["seconds"]
    out = df.groupby("stage", sort=False).agg(runs=("seconds", "size"), seconds=("seconds", "sum"),
                                              started=("started", "min"), finished=("finished", "max"))
    out["wall seconds"] = out["finished"] - out["started"]
    return out.drop(columns=["started", "finished"]).reset_index().round({"seconds": 1, "wall seconds": 1})


def _wall_span(log: dict[str, Any]) -> float | None:
    """Seconds from the first run's start to the last run's finish (None without finish times)."""
    spans = [(float(v["finished"]) - float(v.get("seconds", 0.0)), float(v["finished"]))
             for v in log.get("nodes", {}).values() if "finished" in v]
    return max(f for _, f in spans) - min(s for s, _ in spans) if spans else None


def _results_sections(results: Path) -> list[str]:
    parts = []
    shown = set()
    csvs = sorted(results.glob("*.csv")) if results.exists() else []
    for stem, title in KNOWN_RESULTS:
        for csv in [c for c in csvs if c.stem == stem or c.stem.startswith(stem + "_")]:
            parts.append(_csv_section(csv, title if csv.stem == stem else f"{title} ({csv.stem})"))
            shown.add(csv)
    for csv in csvs:
        if csv not in shown:
            parts.append(_csv_section(csv, csv.stem.replace("_", " ")))
    if not parts:
        parts.append('<p class="note">No results were written yet.</p>')
    return parts


def _csv_section(csv: Path, title: str) -> str:
    try:
        df = pd.read_csv(csv)
    except Exception as exc:
        return f"<h3>{html.escape(title)}</h3><p class='note'>{html.escape(csv.name)} unreadable: {exc}</p>"
    table = df.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0)
    md = csv.with_suffix(".md")
    link = f' · <a href="../results/{md.name}">Markdown</a>' if md.exists() else ""
    return (f"<h3>{html.escape(title)}</h3><p><a href='../results/{csv.name}'>CSV</a>{link}</p>{table}")


def _figure_sections(figures: Path) -> list[str]:
    pngs = sorted(figures.glob("*.png")) if figures.exists() else []
    parts, shown = [], set()
    for prefix, title in KNOWN_FIGURES:
        for png in [p for p in pngs if p.stem.startswith(prefix) and p not in shown]:
            parts.append(_figure(png, f"{title} ({png.stem})"))
            shown.add(png)
    parts += [_figure(p, p.stem.replace("_", " ")) for p in pngs if p not in shown]
    return parts or ['<p class="note">No figures were written yet.</p>']


def _figure(png: Path, title: str) -> str:
    pdf = png.with_suffix(".pdf")
    link = f' <a href="../figures/{pdf.name}">(PDF)</a>' if pdf.exists() else ""
    return (f"<figure><img src='../figures/{png.name}' alt='{html.escape(png.stem)}'>"
            f"<figcaption>{html.escape(title)}{link}</figcaption></figure>")


def render_notebooks(profile: str) -> list[Path]:
    """Executed notebooks -> ``report/notebooks/*.html`` (nbconvert); returns the written paths."""
    import nbformat
    from nbconvert import HTMLExporter

    src = paths.notebooks_out_dir(profile)
    dst = paths.report_dir(profile) / "notebooks"
    exporter = HTMLExporter()
    out = []
    for nb_path in sorted(src.glob("*.ipynb")) if src.exists() else []:
        target = dst / (nb_path.stem + ".html")
        if target.exists() and target.stat().st_mtime >= nb_path.stat().st_mtime:
            out.append(target)
            continue
        body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
        save_text(body, target)
        out.append(target)
    return out


def _wall_text(span: float | None) -> str:
    if span is None:
        return ""
    return (f"; wall clock from the first run's start to the last run's finish: {span / 60:.1f} min (runs side by "
            "side overlap; a pause between invocations of the pipeline is included)")


def build_report(profile: str, source: str | None = None) -> Path:
    """Write ``runs/<profile>/report/index.html`` and return its path."""
    run = paths.run_dir(profile)
    log_path = run / "pipeline_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    notebooks = render_notebooks(profile)
    data = _data_info(profile, source)
    times = _stage_times(log)
    total = float(times["seconds"].sum()) if len(times) else 0.0
    synthetic = str(data.get("source", "")).lower() == "synthetic"
    caveat = (
        '<p class="note">These numbers come from the kit\'s <b>synthetic</b> cohort (MNI152-based heads with '
        "simulated pathologies), not from IXI/BraTS21/MSLUB/ATLAS/WMH. Compare trends (model ranking, effect of "
        "conditioning), not absolute values, with the paper's columns.</p>" if synthetic else "")
    body = [
        f"<h1>cDDPM reproduction — profile <code>{html.escape(profile)}</code></h1>",
        f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Paper: Behrendt et al., <i>Guided Reconstruction "
        "with Conditioned Diffusion Models for Unsupervised Anomaly Detection in Brain MRIs</i> (2023).</p>",
        caveat,
        "<h2>Data and profile</h2>", _kv_table(data),
        "<h2>Tables (reproduced vs paper)</h2>", *_results_sections(paths.results_dir(profile)),
        "<h2>Figures</h2>", *_figure_sections(paths.figures_dir(profile)),
        "<h2>Wall time per stage</h2>", times.to_html(index=False, border=0, na_rep="–"),
        f"<p>Total notebook time: {total / 60:.1f} min{_wall_text(_wall_span(log))}.</p>",
        "<h2>Environment</h2>", _kv_table(_hardware()), _kv_table(_versions()),
        "<h2>Executed notebooks</h2><ul>",
        *[f"<li><a href='notebooks/{p.name}'>{html.escape(p.stem)}</a></li>" for p in notebooks],
        "</ul>",
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cDDPM reproduction ({profile})</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    return save_text(page, paths.report_dir(profile) / "index.html")
