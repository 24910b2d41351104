"""quality: SSIM, PSNR, l1-error, l1-ratio against independent formulas (paper §4.5.1, Table 2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cddpm_lib import quality as Q

NO_BF16 = ("needs a CPU on which oneDNN runs bfloat16 (AVX-512 or newer) or a CUDA device; running in float32 "
           "on cpu")


def _ssim_map_reference(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Wang et al. (2004) Eq. 13 with an 11-tap Gaussian window (σ = 1.5), written out with scipy."""
    f = lambda a: gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def _pair(seed=0, shape=(16, 16, 12)):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:13, 2:14, 1:11] = 1
    return x, y, mask


def test_ssim_one_for_identical_volumes():
    x, _, mask = _pair()
    assert Q.ssim(x, x.copy(), mask) == pytest.approx(1.0)
    assert Q.ssim(x, x.copy(), mask, dims="2d") == pytest.approx(1.0)


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_ssim_map_matches_wang_formula_on_random_images(dims):
    x, y, _ = _pair()
    if dims == "3d":
        ref = _ssim_map_reference(x, y)
    else:
        ref = np.stack([_ssim_map_reference(x[..., z], y[..., z]) for z in range(x.shape[-1])], -1)
    np.testing.assert_allclose(Q.ssim_map(x, y, dims=dims), ref, atol=1e-10)


def test_ssim_masked_mean_uses_brain_voxels_only():
    x, y, mask = _pair()
    ref = _ssim_map_reference(x, y)[mask > 0].mean()
    assert Q.ssim(x, y, mask) == pytest.approx(ref, abs=1e-10)
    y2 = y.copy()
    y2[mask == 0] = 0.0  # changing the background does not move the brain mean much
    assert Q.ssim(x, y2, mask) != pytest.approx(Q.ssim(x, y2, np.ones_like(mask)))


def test_ssim_constant_images():
    a = np.full((12, 12, 12), 0.4)
    assert Q.ssim(a, a.copy()) == pytest.approx(1.0)
    b = np.full((12, 12, 12), 0.6)
    c1 = 0.01**2
    assert Q.ssim(a, b) == pytest.approx((2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1))


def test_psnr_matches_formula_inside_mask():
    x, y, mask = _pair()
    m = mask > 0
    mse = np.mean((x[m] - y[m]) ** 2)
    assert Q.psnr(x, y, mask) == pytest.approx(10 * math.log10(1.0 / mse))


def test_psnr_identical_is_infinite_or_capped():
    x, _, mask = _pair()
    assert Q.psnr(x, x.copy(), mask) == math.inf
    assert Q.psnr(x, x.copy(), mask, cap_db=60.0) == 60.0
    assert Q.psnr(x, x + 1e-9, mask, cap_db=60.0) == 60.0


def test_psnr_constant_images():
    a, b = np.full((4, 4, 4), 0.2), np.full((4, 4, 4), 0.3)
    assert Q.psnr(a, b) == pytest.approx(20.0)  # mse = 0.01


def test_l1_error_and_split():
    x = np.zeros((4, 4, 4))
    y = np.zeros_like(x)
    brain = np.zeros_like(x, dtype=np.uint8)
    brain[1:3, 1:3, :] = 1
    seg = np.zeros_like(brain)
    seg[1, 1, :] = 1
    y[1, 1, :] = 0.8  # anomaly poorly reconstructed
    y[2, 2, :] = 0.2  # one healthy brain voxel per slice wrong
    y[0, 0, :] = 0.5  # background error: outside the brain
    unhealthy, healthy = Q.l1_split(x, y, brain, seg)
    assert unhealthy == pytest.approx(0.8)
    assert healthy == pytest.approx(0.2 / 3)
    u_vol, h_vol = Q.l1_split(x, y, brain, seg, region="volume")
    assert u_vol == pytest.approx(0.8) and h_vol == pytest.approx((0.2 + 0.5) / 15)
    assert Q.l1_error(x, y, brain) == pytest.approx((0.8 + 0.2) / 4)


def test_volume_quality_regions():
    rng = np.random.default_rng(0)
    brain = np.zeros((12, 12, 12), np.uint8)
    brain[2:10, 3:9, 1:11] = 1
    x = rng.random(brain.shape) * brain
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1) * brain  # background 0 in both
    default = Q.volume_quality(x, y, brain)
    in_brain = Q.volume_quality(x, y, brain, l1_error_region="brain")
    # the volume's l1 (authors' code) is the brain's times the brain's share of the volume
    assert default["l1"] == pytest.approx(in_brain["l1"] * brain.mean())
    assert default["ssim"] == in_brain["ssim"] == pytest.approx(Q.ssim(x, y, brain))
    whole = Q.volume_quality(x, y, brain, similarity_region="volume")
    assert whole["ssim"] == pytest.approx(Q.ssim(x, y)) and whole["psnr"] == pytest.approx(Q.psnr(x, y))
    assert whole["psnr"] > default["psnr"]  # the error-free background raises the volume's PSNR
    with pytest.raises(ValueError, match="l1_error_region"):
        Q.volume_quality(x, y, brain, l1_error_region="head")


def test_l1_ratio_is_ratio_of_means_ignoring_empty():
    assert Q.l1_ratio([0.4, math.nan, 0.2], [0.1, 0.1, 0.1]) == pytest.approx(3.0)
    assert math.isnan(Q.l1_ratio([math.nan], [0.1]))


def test_errors_name_the_problem():
    x, y, mask = _pair()
    with pytest.raises(ValueError, match="differ in shape"):
        Q.ssim(x, y[:-1], None)
    with pytest.raises(ValueError, match="mask is empty"):
        Q.psnr(x, y, np.zeros_like(mask))
    with pytest.raises(ValueError, match="'2d' or '3d'"):
        Q.ssim_map(x, y, dims="4d")


# ---------------------------------------------------------------------------------------------------------------
# The stage: tiny cohort and tiny checkpoints in a temporary run root


def write_cohort(root, monkeypatch, specs=("ae", "vae"), shape=(16, 16, 12)):
    """IXI test + one volume per unhealthy set (with a bright lesion) and tiny trained-from-nothing checkpoints."""
    import pandas as pd
    import torch

    from cddpm_lib import datasets, models, paths
    from cddpm_lib.data import phantom_volume
    from cddpm_lib.volumes import save_dataframe, save_nifti, save_torch

    monkeypatch.setenv("CDDPM_DATA_ROOT", str(root / "data"))
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(root / "runs"))
    monkeypatch.delenv("CDDPM_MEDICALNET_WEIGHTS", raising=False)
    base, rows, rng = paths.source_dir("synthetic", "smoke"), [], np.random.default_rng(0)
    for dataset, sid, w in [("IXI", "ixi0", "t2"), ("IXI", "ixi1", "t2"),
                            *((d, f"{d}0", w) for d, w in datasets.WEIGHTING_OF.items())]:
        img, mask = phantom_volume(shape, np.random.default_rng(rng.integers(2**32)), w)
        d, files = base / "preprocessed" / dataset / sid, {"t1": "", "t2": "", "seg": ""}
        if dataset != "IXI":
            seg = np.zeros(shape, np.uint8)
            seg[5:9, 6:10, 4:8] = 1
            img = np.where(seg > 0, 1.0, img).astype(np.float32)
            files["seg"] = str(save_nifti(seg, np.eye(4), d / "seg.nii.gz", dtype=np.uint8))
        files[w] = str(save_nifti(img, np.eye(4), d / f"{w}.nii.gz"))
        files["brain_mask"] = str(save_nifti(mask, np.eye(4), d / "brain_mask.nii.gz", dtype=np.uint8))
        rows.append({"dataset": dataset, "subject_id": sid, "split": "test", "fold": -1, **files, "site": "s",
                     "skull_stripped": 1, "healthy": int(dataset == "IXI")})
    save_dataframe(pd.DataFrame(rows), paths.preprocessed_manifest_path("synthetic", "smoke"))
    for i, name in enumerate(specs):
        for w in ("t2", "t1"):
            torch.manual_seed(i)
            m = models.build_model(name, image_size=shape[:2], channels=(4, 8), latent_dim=4)
            save_torch({"model_name": name, "hparams": m.hparams, "model": m.state_dict()},
                       paths.checkpoint_dir("smoke", datasets.model_id(name, w), 0) / "best.pt")


@pytest.fixture
def stage(tmp_path, monkeypatch):
    write_cohort(tmp_path, monkeypatch)
    return Q.ReconstructionQualityConfig(profile="smoke", folds=(0,), models=("ae", "vae"), permutation_rounds=50,
                                         max_batch=8)


def test_evaluate_healthy_scores_every_volume_and_caches(stage):
    from cddpm_lib import paths

    scores, notes = Q.evaluate_healthy(stage, log=lambda m: None)
    assert len(scores) == 4 and set(scores["model"]) == {"ae", "vae"}
    assert scores["ssim"].between(-1, 1).all() and (scores["l1"] > 0).all()
    assert "n/a — MedicalNet weights not found" in notes[0] and (scores["perceptual_kind"] == "none").all()
    cached = paths.recon_dir("smoke", "ae_t2", 0, "default", "IXI") / "ixi0.npz"
    assert cached.exists()
    again, _ = Q.evaluate_healthy(stage, log=lambda m: None)  # reused from the cache: identical
    np.testing.assert_allclose(again["l1"], scores["l1"])


def test_quality_stage_says_a_float32_fallback_once_through_its_log(stage, monkeypatch):
    import dataclasses
    import warnings

    from cddpm_lib import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    cfg, said = dataclasses.replace(stage, amp="bf16", device="cpu"), []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said through the stage's log, not as warnings per model and data set
        Q.evaluate_healthy(cfg, log=said.append)
        assert [m for m in said if "warning" in m] == [f"[quality] warning: amp='bf16' {NO_BF16}"]
        said.clear()
        amp = runtime.stage_amp(cfg.amp, runtime.default_device(cfg.device), said.append, "[quality]")
        Q.evaluate_healthy(cfg, log=said.append, amp=amp)  # the notebook resolves it once for both evaluations
        Q.evaluate_unhealthy(cfg, log=said.append, amp=amp)
    assert amp == "none" and len([m for m in said if "warning" in m]) == 1


def test_evaluate_unhealthy_covers_eval_sets(stage):
    scores = Q.evaluate_unhealthy(stage, log=lambda m: None)
    assert sorted(scores["dataset"].unique()) == ["ATLAS", "BraTS21", "MSLUB", "WMH"]
    assert np.isfinite(scores[["l1_unhealthy", "l1_healthy"]].to_numpy()).all()


def test_missing_checkpoint_names_the_file(stage):
    with pytest.raises(FileNotFoundError, match="dae_t2/fold0/best.pt missing"):
        Q.load_trained("smoke", "dae", "t2", 0)


def test_fold_scores_and_table2_files(stage):
    from cddpm_lib import paths

    healthy, notes = Q.evaluate_healthy(stage, log=lambda m: None)
    unhealthy = Q.evaluate_unhealthy(stage, log=lambda m: None)
    scores = Q.fold_scores(healthy, unhealthy)
    assert list(scores["model"]) == ["ae", "vae"] and scores["ratio_WMH"].notna().all()
    sbs = Q.table2_long(scores, "none", rounds=50)
    csv = Q.write_table2(sbs, notes, stage)
    md = (paths.results_dir("smoke") / "table2.md").read_text()
    assert csv.exists() and "n/a — MedicalNet weights not found" in md and "paper 76.11±0.27" in md
    assert "not LPIPS" not in md.split("\n")[2]  # no substitute column without an encoder


def test_table2_labels_the_substitute_never_as_lpips():
    import pandas as pd

    scores = pd.DataFrame({"model": ["ae", "dae"], "fold": [0, 0], "ssim": [0.7, 0.9], "psnr": [20.0, 30.0],
                           "perceptual": [0.004, 0.001], "l1": [0.03, 0.01], **{f"ratio_{d}": [2.0, 3.0] for d in
                                                                               ("BraTS21", "MSLUB", "ATLAS", "WMH")}})
    sbs = Q.table2_long(scores, "substitute", rounds=10)
    ours_lpips = sbs[(sbs["metric"] == "LPIPS e-3 ↓")]["mean"]
    assert ours_lpips.isna().all(), "substitute values must not appear in the LPIPS column"
    sub = sbs[sbs["metric"] == Q.SUBSTITUTE_HEADER]
    assert sorted(sub["mean"]) == pytest.approx([1.0, 4.0]) and sub["paper_mean"].isna().all()
    real = Q.table2_long(scores, "lpips", rounds=10)
    assert real[(real["metric"] == "LPIPS e-3 ↓") & (real["model"] == "dae")]["mean"].iloc[0] == pytest.approx(1.0)
    ssim = real[(real["metric"] == "SSIM % ↑") & (real["model"] == "ae")].iloc[0]
    assert ssim["mean"] == pytest.approx(70.0) and ssim["paper_mean"] == pytest.approx(76.11)


def test_star_needs_significance_over_every_other_model():
    import pandas as pd

    folds = {"dae": [0.990, 0.991, 0.989, 0.992, 0.990], "ae": [0.70, 0.74, 0.69, 0.73, 0.71],
             "vae": [0.72, 0.70, 0.73, 0.69, 0.715]}
    scores = pd.DataFrame([{"model": m, "fold": k, "ssim": v} for m, vals in folds.items()
                           for k, v in enumerate(vals)])
    assert Q.significance_stars(scores, "ssim", True, rounds=500, alpha=0.05) == "dae"
    # lowest is best here: ae and vae are indistinguishable, so no star
    assert Q.significance_stars(scores, "ssim", False, rounds=500, alpha=0.05) is None
    one_fold = scores[scores["fold"] == 0]
    assert Q.significance_stars(one_fold, "ssim", True, rounds=500, alpha=0.05) is None
    two_folds = scores[scores["fold"] < 2]  # 2 against 2 cannot reach p < 0.05: never a star
    assert Q.significance_stars(two_folds, "ssim", True, rounds=500, alpha=0.05) is None
    three = scores[scores["fold"] < 3]  # 3 against 3: the floor is α itself, a Monte-Carlo p may dip below it
    assert Q.significance_stars(three, "ssim", True, rounds=10_000, alpha=0.05) is None
    assert "No star is possible with 2 fold(s)" in Q._star_floor(Q.ReconstructionQualityConfig(folds=(0, 1)))
    assert "smallest possible p-value is 0.00397" in Q._star_floor(Q.ReconstructionQualityConfig())


def test_config_rejects_bad_values_and_matches_notebook():
    import papermill

    from cddpm_lib.config import ConfigError
    from cddpm_lib.paths import repo_root

    with pytest.raises(ConfigError, match="unknown model 'cddpm-xyz'"):
        Q.ReconstructionQualityConfig(models=("cddpm-xyz",))
    assert Q.parse_model("cddpm-ssl") == ("cddpm", True) and Q.model_label("cddpm-ssl") == "cDDPM (SSL)"
    params = papermill.inspect_notebook(str(repo_root() / "notebooks" / "04_reconstruction_quality.ipynb"))
    assert set(params) == set(Q.ReconstructionQualityConfig.field_names())
    import ast

    defaults = {k: ast.literal_eval(v["default"]) for k, v in params.items()}
    paper = Q.ReconstructionQualityConfig.from_namespace({**defaults, "profile": "paper"})
    assert paper == Q.ReconstructionQualityConfig(profile="paper", source="real")


def test_figure2_inputs_pick_largest_brain_slice(tmp_path, monkeypatch):
    import torch

    from cddpm_lib import datasets, models, paths
    from cddpm_lib.volumes import save_torch

    write_cohort(tmp_path, monkeypatch, specs=())
    tiny = dict(image_size=(16, 16), model_channels=4, channel_mult=(1, 2), num_res_blocks=1, num_heads=1)
    for name, extra in (("ddpm", {}), ("cddpm", dict(encoder_depth=18, encoder_width=4, cond_dim=8))):
        torch.manual_seed(0)
        m = models.build_model(name, **tiny, **extra)
        save_torch({"model_name": name, "hparams": m.hparams, "model": m.state_dict()},
                   paths.checkpoint_dir("smoke", datasets.model_id(name, "t2", name == "cddpm"), 0) / "best.pt")
    cfg = Q.ReconstructionQualityConfig(profile="smoke", folds=(0,))
    cddpm, ddpm, image, mask = Q.figure2_inputs(cfg)
    assert cddpm.name == "cddpm" and ddpm.name == "ddpm" and image.shape == mask.shape == (16, 16)
    assert mask.sum() > 0 and image[mask == 0].max() == 0
