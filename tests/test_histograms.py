"""histograms: density, true KL divergence, the paper's entropy-difference expression (paper §4.5.2)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr
from scipy.stats import entropy as scipy_entropy

from cddpm_lib import histograms as H


def _rng():
    return np.random.default_rng(0)


def test_density_integrates_to_one():
    v = _rng().beta(2, 5, size=5000)
    edges = H.common_edges(v, n_bins=500)
    d = H.density_histogram(v, edges)
    assert d.shape == (500,)
    assert np.sum(d * np.diff(edges)) == pytest.approx(1.0)


def test_density_matches_numpy_density():
    v = _rng().normal(0.5, 0.1, size=3000)
    edges = H.common_edges(v, n_bins=50)
    expected, _ = np.histogram(v, bins=edges, density=True)
    np.testing.assert_allclose(H.density_histogram(v, edges), expected)


def test_values_outside_edges_are_rejected():
    with pytest.raises(ValueError, match="outside the edges"):
        H.density_histogram(np.array([0.0, 2.0]), np.linspace(0, 1, 11))


def test_common_edges_cover_both_samples():
    e = H.common_edges(np.array([0.2, 0.4]), np.array([-0.1, 1.3]), n_bins=10)
    assert e[0] == pytest.approx(-0.1) and e[-1] == pytest.approx(1.3) and e.size == 11


def test_constant_data_gets_positive_width():
    e = H.common_edges(np.full(10, 0.3), n_bins=5)
    assert np.all(np.diff(e) > 0)


def test_kl_zero_for_identical_histograms():
    v = _rng().random(1000)
    pair = H.histogram_pair(v, v.copy(), n_bins=100)
    assert pair.kld == pytest.approx(0.0, abs=1e-12)
    assert pair.paper_expression == pytest.approx(0.0, abs=1e-12)


def test_kl_nonnegative_on_random_histograms():
    rng = _rng()
    for _ in range(20):
        p, q = rng.random(30), rng.random(30)
        p[rng.random(30) < 0.3] = 0
        assert H.kl_divergence(p / p.sum(), q / q.sum()) >= 0


def test_kl_matches_scipy_without_empty_bins():
    rng = _rng()
    p, q = rng.random(40) + 0.01, rng.random(40) + 0.01
    p, q = p / p.sum(), q / q.sum()
    assert H.kl_divergence(p, q, eps=0.0) == pytest.approx(float(np.sum(rel_entr(p, q))), rel=1e-10)
    assert H.kl_divergence(p, q, eps=0.0) == pytest.approx(scipy_entropy(p, q), rel=1e-10)


def test_kl_finite_with_empty_reconstruction_bins():
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([1.0, 0.0, 0.0])
    value = H.kl_divergence(p, q)
    assert np.isfinite(value) and value > 1.0  # large but finite thanks to eps


def test_kl_rejects_densities():
    with pytest.raises(ValueError, match="sum to"):
        H.kl_divergence(np.array([2.0, 3.0]), np.array([2.5, 2.5]))


def test_paper_expression_is_entropy_difference_not_divergence():
    # a histogram and its mirror image have equal entropy: the paper's expression is 0, the KL divergence is not
    p = np.array([0.7, 0.2, 0.1])
    q = p[::-1].copy()
    assert H.paper_expression(p, q) == pytest.approx(0.0, abs=1e-12)
    assert H.kl_divergence(p, q) > 0.5
    assert H.entropy(p) == pytest.approx(scipy_entropy(p))


def test_paper_expression_can_be_negative():
    assert H.paper_expression(np.array([1.0, 0.0]), np.array([0.5, 0.5])) < 0


def test_region_values_excludes_annotation():
    img = np.arange(8, dtype=float).reshape(2, 2, 2)
    rec = img + 1
    mask = np.ones_like(img)
    mask[0, 0, 0] = 0
    seg = np.zeros_like(img)
    seg[1, 1, 1] = 1
    x, y = H.region_values(img, rec, mask, seg)
    assert sorted(x) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(y, x + 1)


def test_kld_table_ratios_and_paper_column():
    import pandas as pd

    rows = []
    for fold, (kd, kc) in enumerate([(2.0, 0.5), (4.0, 1.5)]):
        for dataset in ("IXI", "BraTS21"):
            rows += [{"fold": fold, "model": "ddpm", "dataset": dataset, "contrast": 2.0, "kld": kd,
                      "paper_expression": 0.2},
                     {"fold": fold, "model": "cddpm", "dataset": dataset, "contrast": 2.0, "kld": kc,
                      "paper_expression": -0.1}]
    table = H.kld_table(pd.DataFrame(rows), "ddpm", "cddpm")
    ixi = table[table["data set"] == "IXI"].iloc[0]
    assert ixi["ratio DDPM/cDDPM (KL)"] == pytest.approx(3.0)  # ratio of fold means 3.0 / 1.0
    assert ixi["paper ratio"] == 17.0
    assert ixi["ratio DDPM/cDDPM (paper expression)"] == pytest.approx(-2.0)
    assert ixi["KL(in‖rec) DDPM"] == "3.0000 ± 1.0000" and ixi["folds"] == 2
    assert np.isnan(table[table["data set"] == "BraTS21"].iloc[0]["paper ratio"])


def test_domain_shift_stage_end_to_end(tmp_path, monkeypatch):
    import matplotlib

    from cddpm_lib import paths
    from test_quality import write_cohort

    from cddpm_lib import runtime

    matplotlib.use("Agg")
    write_cohort(tmp_path, monkeypatch)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)  # bf16 asked for, float32 runs
    cfg = H.DomainShiftConfig(profile="smoke", folds=(0,), ddpm="ae", cddpm="vae", diffusion_variant="default",
                              contrasts=(1.0, 2.0), n_bins=50, max_batch=8, amp="bf16", device="cpu")
    said = []
    kld, pairs = H.collect_histograms(cfg, log=said.append)
    assert len([m for m in said if "float32" in m]) == 1  # once for the stage, not per model, set and contrast
    assert len(kld) == 2 * 2 * 2 and (kld["kld"] >= 0).all()
    pair = pairs[(0, "ae", "BraTS21", 2.0)]
    assert pair.edges.size == 51 and np.sum(pair.density_input * np.diff(pair.edges)) == pytest.approx(1.0)
    # BraTS21: the annotated lesion is excluded from the healthy-voxel histogram
    from cddpm_lib import quality

    row = quality.test_volumes(cfg, "BraTS21", "t2").iloc[0]
    case = quality.load_case(row, "t2")
    assert pair.n_voxels == int(((case["brain_mask"] > 0) & (case["seg"] == 0)).sum())
    # contrast 2 squares the input intensities the histogram sees
    assert pairs[(0, "ae", "IXI", 2.0)].edges[-1] < pairs[(0, "ae", "IXI", 1.0)].edges[-1] + 1e-6
    table = H.kld_table(kld, "ae", "vae")
    assert list(table["paper ratio"].iloc[:2]) == [2.3, 17.0]
    H.write_kld(table, cfg)
    assert "not a divergence" in (paths.results_dir("smoke") / "kld.md").read_text()
    fig = H.plot_histograms(pairs, cfg)
    assert len(fig.axes) == 2 * 2 * 2


def test_config_matches_notebook():
    import ast

    import papermill

    from cddpm_lib.config import ConfigError
    from cddpm_lib.paths import repo_root

    params = papermill.inspect_notebook(str(repo_root() / "notebooks" / "05_domain_shift.ipynb"))
    assert set(params) == set(H.DomainShiftConfig.field_names())
    defaults = {k: ast.literal_eval(v["default"]) for k, v in params.items()}
    resolved = H.DomainShiftConfig.from_namespace({**defaults, "profile": "paper"})
    assert resolved == H.DomainShiftConfig(profile="paper", source="real")
    with pytest.raises(ConfigError, match="figure_fold"):
        H.DomainShiftConfig(folds=(0,), figure_fold=3)
