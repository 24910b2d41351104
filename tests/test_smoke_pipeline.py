"""The whole paper under the smoke profile: every notebook executed by papermill, tables/figures/report checked.

This is the end-to-end test of the kit (a few minutes on 2 cores). It runs once per test session into a temporary
data/runs root and the assertions read what the notebooks wrote.
"""
from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pandas as pd
import pytest

from cddpm_lib import paths, pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("CDDPM_DATA_ROOT", str(root / "data"))
    mp.setenv("CDDPM_RUNS_ROOT", str(root / "runs"))
    lines: list[str] = []
    try:
        status = pipeline.run_pipeline("smoke", jobs=1, log=lines.append)
        yield status, lines
    finally:
        mp.undo()


def _numbers(df: pd.DataFrame) -> list[float]:
    vals = []
    for col in df.columns:
        for v in pd.to_numeric(df[col], errors="coerce"):
            if isinstance(v, float) and math.isfinite(v):
                vals.append(v)
    return vals


def test_every_node_ran(smoke_run):
    status, lines = smoke_run
    assert status, "no node ran"
    assert all(v["status"] == "ran" for v in status.values()), status
    assert any("finished" in line for line in lines)


def test_tables_hold_numbers(smoke_run):
    # results live under the module's temporary runs root; the pipeline's log line names the report
    status, lines = smoke_run
    report_line = next(line for line in lines if line.startswith("[pipeline] report "))
    report = paths.Path(report_line.split(" ", 2)[2])
    results = report.parent.parent / "results"
    for name in ("table2", "table3", "table4", "kld"):
        csv = results / f"{name}.csv"
        assert csv.exists(), f"{csv} missing"
        assert (results / f"{name}.md").exists()
        assert _numbers(pd.read_csv(csv)), f"{name}.csv holds no numbers"
    figures = report.parent.parent / "figures"
    for prefix in ("fig2", "fig3", "fig4", "fig5", "fig6"):
        assert list(figures.glob(f"{prefix}*.png")), f"no {prefix} figure"
        assert list(figures.glob(f"{prefix}*.pdf")), f"no {prefix} PDF"


def test_report_links_everything(smoke_run):
    status, lines = smoke_run
    report_line = next(line for line in lines if line.startswith("[pipeline] report "))
    report = paths.Path(report_line.split(" ", 2)[2])

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.links, self.tds = [], [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a["src"])
            if tag == "a":
                self.links.append(a["href"])

    p = P()
    p.feed(report.read_text())
    assert len(p.imgs) >= 5
    for src in p.imgs + p.links:
        assert (report.parent / src).exists(), f"broken link {src}"
    assert sum(link.startswith("notebooks/") for link in p.links) == len(status) - 1


def test_rerun_skips_everything(smoke_run):
    status, lines = smoke_run
    report_line = next(line for line in lines if line.startswith("[pipeline] report "))
    runs_root = paths.Path(report_line.split(" ", 2)[2]).parent.parent.parent
    mp = pytest.MonkeyPatch()
    mp.setenv("CDDPM_RUNS_ROOT", str(runs_root))
    mp.setenv("CDDPM_DATA_ROOT", str(runs_root.parent / "data"))
    try:
        again = pipeline.run_pipeline("smoke", report=False, log=lambda m: None)
    finally:
        mp.undo()
    assert all(v["status"].startswith("skipped") for v in again.values())
    log = json.loads((runs_root / "smoke" / "pipeline_log.json").read_text())
    assert log["nodes"]
