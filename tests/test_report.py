"""report: HTML built from what the stages wrote, parsed back."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from cddpm_lib import paths, report
from cddpm_lib.volumes import save_figure


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.imgs, self.links, self.h = [], [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a":
            self.links.append(a.get("href"))
        self._in = tag

    def handle_data(self, data):
        if self._in in ("td", "th"):
            self.cells.append(data.strip())
        if self._in in ("h1", "h2", "h3"):
            self.h.append(data.strip())


def parse(path):
    p = _Collect()
    p.feed(path.read_text())
    return p


def test_report_shows_results_figures_and_times(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    res = paths.results_dir("smoke")
    res.mkdir(parents=True)
    pd.DataFrame({"model": ["cDDPM"], "BraTS21 DICE": [51.234], "paper BraTS21 DICE": [51.34]}).to_csv(
        res / "table3.csv", index=False)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure(fig, paths.figures_dir("smoke") / "fig5_dice_vs_t")
    plt.close(fig)
    info = paths.source_dir("synthetic", "smoke") / "data_info.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"source": "synthetic", "manifest": "generated"}))
    (paths.run_dir("smoke") / "pipeline_log.json").write_text(json.dumps(
        {"nodes": {"data": {"stage": "data", "seconds": 3.0, "status": "ran", "finished": 1003.0},
                   "training/ddpm_t2/fold0": {"stage": "training", "seconds": 60.0, "status": "ran",
                                              "finished": 1070.0},
                   "training/ddpm_t2/fold1": {"stage": "training", "seconds": 50.0, "status": "ran",
                                              "finished": 1060.0}}}))
    out = report.build_report("smoke")
    parsed = parse(out)
    assert "51.23" in parsed.cells and "51.34" in parsed.cells
    assert "../figures/fig5_dice_vs_t.png" in parsed.imgs
    assert any(h.startswith("Table 3") for h in parsed.h)
    assert "training" in parsed.cells and "110.0" in parsed.cells  # two runs, 60 + 50 s of notebook time
    assert "60.0" in parsed.cells  # side by side: 60 s of wall clock, from 1010 to 1070
    assert "wall clock from the first run's start to the last run's finish: 1.2 min" in out.read_text()
    assert "synthetic" in out.read_text()


def test_report_without_results_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    text = report.build_report("smoke").read_text()
    assert "No results were written yet" in text and "data stage not run" in text


def test_large_tables_are_linked_not_inlined(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    res = paths.results_dir("smoke")
    res.mkdir(parents=True)
    n = report.MAX_INLINE_ROWS + 1
    pd.DataFrame({"subject": [f"s{i:04d}" for i in range(n)], "note": ["two\nlines"] * n,  # quoted newlines
                  "dice": range(n)}).to_csv(res / "segmentation_per_volume.csv", index=False)
    pd.DataFrame({"t": [100, 250], "dice": [0.1, 0.2]}).to_csv(res / "fig5_dice_vs_t.csv", index=False)
    pd.DataFrame({"row": ["cDDPM", "DDPM"], "BraTS21 DICE": [51.2, 40.1], "BraTS21 DICE *": [True, False],
                  "BraTS21 DICE Δ": [-0.1, 2.0]}).to_csv(res / "table3.csv", index=False)
    (paths.run_dir("smoke") / "pipeline_log.json").write_text(json.dumps(
        {"nodes": {"ssl/a": {"stage": "ssl", "seconds": 10.0, "status": "ran", "finished": 1010.0},
                   "training/b": {"stage": "training", "seconds": 80.0, "status": "ran", "finished": 1090.0},
                   "ssl/c": {"stage": "ssl", "seconds": 10.0, "status": "ran", "finished": 1100.0}}}))
    out = report.build_report("smoke")
    text, parsed = out.read_text(), parse(out)
    assert "s0000" not in text  # not inlined
    assert f"segmentation per volume: {n:,} rows" in text and "../results/segmentation_per_volume.csv" in parsed.links
    assert parsed.h.index("Raw data") > parsed.h.index("Figures")
    assert "Other results" in parsed.h and "250" in parsed.cells  # small tables stay inline
    # significance as a star or blank, not True/False
    cells = [c for c in parsed.cells if c]
    assert cells[cells.index("cDDPM"):][:4] == ["cDDPM", "51.2", "*", "-0.1"]
    assert cells[cells.index("DDPM"):][:3] == ["DDPM", "40.1", "2"] and "False" not in cells
    # the stage's span (1000 -> 1100 s) is labelled as a span, not as the stage's time (20 s of SSL work)
    assert report.SPAN_COLUMN in parsed.cells and "wall seconds" not in text
    assert cells[cells.index("ssl"):][:4] == ["ssl", "2", "20.0", "100.0"]
