"""The HTML report of a run: reproduced vs paper tables, figures, provenance, wall times, executed notebooks.

``build_report(profile)`` reads only what the stages wrote under ``runs/<profile>/`` (results CSVs, figures,
``pipeline_log.json``, executed notebooks) and the data stage's ``data_info.json``; it never recomputes a number.
"""
from __future__ import annotations

import csv as csv_module
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
#: results CSVs with more rows than this are linked under "Raw data" instead of shown: per-volume and index tables
#: (thousands of rows at the quick profile, millions at the paper's) would make the page tens to hundreds of MB
MAX_INLINE_ROWS = 200
#: what the column suffixes of the side-by-side tables (``tables.to_wide``, ``ablation``) mean
COLUMN_LEGEND = (
    "Columns: <code>±</code> standard deviation over folds; <code>*</code> marks a statistically significant "
    "result (the test is named in the table's Markdown); <code>paper</code> the paper's value; <code>Δ</code> "
    "reproduced − paper. Table 4 also has <code>delta</code> (reproduced: this post-processing − the full pipeline) "
    "and <code>paper_delta</code> (the same difference in the paper).")
SPAN_COLUMN = "span s (first start → last finish)"
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
    the stage's first run's start to its last run's finish (:data:`SPAN_COLUMN`). The span is shorter than the sum
    when the stage's runs went side by side, and longer than the stage's own work when runs of other stages went in
    between (SSL and training runs interleave), so it is labelled as a span, not as the stage's time."""
    nodes = log.get("nodes", {})
    if not nodes:
        return pd.DataFrame(columns=["stage", "runs", "seconds", SPAN_COLUMN])
    df = pd.DataFrame([{"stage": v.get("stage", k), "seconds": float(v.get("seconds", 0.0)),
                        "finished": float(v.get("finished", np.nan)), "status": v.get("status", "")}
                       for k, v in nodes.items()])
    df["started"] = df["finished"] - df["seconds"]
    out = df.groupby("stage", sort=False).agg(runs=("seconds", "size"), seconds=("seconds", "sum"),
                                              started=("started", "min"), finished=("finished", "max"))
    out[SPAN_COLUMN] = out["finished"] - out["started"]
    return out.drop(columns=["started", "finished"]).reset_index().round({"seconds": 1, SPAN_COLUMN: 1})


def _wall_span(log: dict[str, Any]) -> float | None:
    """Seconds from the first run's start to the last run's finish (None without finish times)."""
    spans = [(float(v["finished"]) - float(v.get("seconds", 0.0)), float(v["finished"]))
             for v in log.get("nodes", {}).values() if "finished" in v]
    return max(f for _, f in spans) - min(s for s, _ in spans) if spans else None


def _results_sections(results: Path, max_rows: int = MAX_INLINE_ROWS) -> tuple[list[str], list[str], list[str]]:
    """HTML of the results CSVs: ``(paper tables, other results, raw data)``. The paper's tables
    (:data:`KNOWN_RESULTS`) and the other CSVs of at most ``max_rows`` rows are shown; larger ones (per-volume
    scores, reconstruction indexes) are only linked, with their size, under "Raw data"."""
    tables, others, raw = [], [], []
    shown = set()
    csvs = sorted(results.glob("*.csv")) if results.exists() else []
    for stem, title in KNOWN_RESULTS:
        for csv in [c for c in csvs if c.stem == stem or c.stem.startswith(stem + "_")]:
            _place(csv, title if csv.stem == stem else f"{title} ({csv.stem})", tables, raw, max_rows)
            shown.add(csv)
    for csv in csvs:
        if csv not in shown:
            _place(csv, csv.stem.replace("_", " "), others, raw, max_rows)
    if not tables and not others and not raw:
        tables.append('<p class="note">No results were written yet.</p>')
    return tables, others, raw


def _count_rows(csv: Path) -> int:
    """Data rows of a CSV, streamed (a paper-size per-volume table is not loaded to be counted)."""
    with csv.open(newline="") as f:
        return max(0, sum(1 for _ in csv_module.reader(f)) - 1)


def _place(csv: Path, title: str, shown: list[str], raw: list[str], max_rows: int) -> None:
    """Append ``csv``'s section to ``shown`` when it has at most ``max_rows`` rows, else its link to ``raw``."""
    try:
        df = pd.read_csv(csv, nrows=max_rows + 1)
    except Exception as exc:
        shown.append(f"<h3>{html.escape(title)}</h3><p class='note'>{html.escape(csv.name)} unreadable: "
                     f"{html.escape(str(exc))}</p>")
        return
    if len(df) <= max_rows:
        shown.append(_csv_section(csv, title, df))
        return
    size = csv.stat().st_size
    size_text = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{max(1, round(size / 1e3))} kB"
    raw.append(f"<li>{html.escape(title)}: {_count_rows(csv):,} rows, {size_text} — "
               f"<a href='../results/{html.escape(csv.name)}'>CSV</a></li>")


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` for reading: the significance columns (``… *``, True/False) as ``*`` or blank."""
    out = df.copy()
    for col in out.columns:
        values = out[col].dropna()
        if str(col).endswith("*") and len(values) and all(isinstance(v, (bool, np.bool_)) for v in values):
            out[col] = ["*" if isinstance(v, (bool, np.bool_)) and v else "" for v in out[col]]
    return out


def _csv_section(csv: Path, title: str, df: pd.DataFrame) -> str:
    table = _display(df).to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0)
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
    tables, others, raw = _results_sections(paths.results_dir(profile))
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
        "<h2>Tables (reproduced vs paper)</h2>", f"<p>{COLUMN_LEGEND}</p>", *tables,
        *(["<h2>Other results</h2>", *others] if others else []),
        "<h2>Figures</h2>", *_figure_sections(paths.figures_dir(profile)),
        *(["<h2>Raw data</h2>", f"<p>Tables of more than {MAX_INLINE_ROWS} rows (per volume, per run), linked "
           "rather than shown:</p><ul>", *raw, "</ul>"] if raw else []),
        "<h2>Wall time per stage</h2>", times.to_html(index=False, border=0, na_rep="–"),
        f"<p><i>seconds</i>: the stage's notebook time, summed over its runs. <i>{html.escape(SPAN_COLUMN)}</i>: "
        "wall clock from the stage's first run's start to its last run's finish; runs side by side make it shorter "
        "than the sum, and runs of other stages in between (SSL and training interleave) make it longer than the "
        "stage's own work.</p>",
        f"<p>Total notebook time: {total / 60:.1f} min{_wall_text(_wall_span(log))}.</p>",
        "<h2>Environment</h2>", _kv_table(_hardware()), _kv_table(_versions()),
        "<h2>Executed notebooks</h2><ul>",
        *[f"<li><a href='notebooks/{p.name}'>{html.escape(p.stem)}</a></li>" for p in notebooks],
        "</ul>",
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cDDPM reproduction ({profile})</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    return save_text(page, paths.report_dir(profile) / "index.html")
