"""Volume reconstruction through the model interface and the resumable evaluation-set writer."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import pytest
import torch

from cddpm_lib import reconstruct
from cddpm_lib.models import build_model
from cddpm_lib.models.base import UADModel
from cddpm_lib.volumes import load_npz, save_nifti


class Affine(UADModel):
    """x̂ = a·x + b per slice; records the batch sizes it saw."""

    name = "affine"

    def __init__(self, a: float = 0.5, b: float = 0.1) -> None:
        super().__init__(a=a, b=b)
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = b
        self.calls: list[int] = []

    def reconstruct(self, x, mask=None, **kwargs: Any):
        self.calls.append(x.shape[0])
        return self.a * x + self.b


class Whole(Affine):
    needs_whole_volume = True


class FakeDiffusion(Affine):
    """Takes t_test / max_batch / generator like the diffusion models; adds seeded noise scaled by t."""

    def reconstruct(self, x, mask=None, t_test: int | Sequence[int] = 500, max_batch: int | None = 64,
                    generator: torch.Generator | None = None, **kwargs: Any):
        self.calls.append(int(max_batch))
        ts = [t_test] if isinstance(t_test, int) else list(t_test)
        noise = torch.stack([torch.randn(x.shape, generator=generator) * t / 1000 for t in ts]).mean(0)
        return x + noise


def _volume(shape=(8, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape).astype(np.float32), (rng.random(shape) < 0.8).astype(np.uint8)


def test_variant_kwargs():
    assert reconstruct.variant_kwargs("t500") == {"t_test": 500}
    assert reconstruct.variant_kwargs("ens") == {"t_test": [250, 500, 750]}
    assert reconstruct.variant_kwargs("default") == {}
    assert reconstruct.variant_name("cddpm", ens=True) == "ens" and reconstruct.variant_name("ae", True) == "default"
    with pytest.raises(ValueError, match="unknown variant"):
        reconstruct.variant_kwargs("t-5")


def test_reconstruct_volume_maps_slices_and_residual():
    image, mask = _volume()
    recon, anomaly = reconstruct.reconstruct_volume(Affine(), image, mask, max_batch=2)
    np.testing.assert_allclose(recon, 0.5 * image + 0.1, atol=1e-6)
    np.testing.assert_allclose(anomaly, np.abs(image - recon), atol=1e-6)


def test_chunking_and_whole_volume():
    image, mask = _volume()
    m = Affine()
    reconstruct.reconstruct_volume(m, image, mask, max_batch=2)
    assert m.calls == [2, 2, 1]
    w = Whole()
    reconstruct.reconstruct_volume(w, image, mask, max_batch=2)
    assert w.calls == [5]


def test_diffusion_kwargs_and_seed():
    image, mask = _volume()
    m = FakeDiffusion()
    a = reconstruct.reconstruct_volume(m, image, mask, max_batch=3, seed=7, t_test=[250, 500])[0]
    b = reconstruct.reconstruct_volume(m, image, mask, max_batch=5, seed=7, t_test=[250, 500])[0]
    c = reconstruct.reconstruct_volume(m, image, mask, max_batch=3, seed=8, t_test=[250, 500])[0]
    assert m.calls == [3, 5, 3]  # one call with all slices, max_batch passed through
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_test_time_arguments_need_a_model_that_takes_them():
    image, mask = _volume()
    with pytest.raises(TypeError, match="t_test"):
        reconstruct.reconstruct_volume(Affine(), image, mask, t_test=500)


def test_own_anomaly_map_is_used():
    image, mask = _volume()
    thresh = build_model("thresh", image_size=image.shape[:2])
    _, anomaly = reconstruct.reconstruct_volume(thresh, image, mask)
    np.testing.assert_allclose(anomaly, image * mask, atol=1e-6)


class Conv(UADModel):
    """x̂ = x + conv(x) with a fixed 3×3 kernel: a network whose precision shows under autocast."""

    name = "conv"

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 30)
            self.conv.bias.fill_(0.01)

    def reconstruct(self, x, mask=None, **kwargs: Any):
        return x + self.conv(x)


def test_bfloat16_reconstruction_follows_float32(monkeypatch):
    """Under bfloat16 autocast the reconstruction is float32 again and within bfloat16's precision (8 bits of
    mantissa: ≤ 2^-8 relative) of the float32 one, but not equal to it; where the CPU cannot it is float32."""
    from cddpm_lib import runtime

    image, mask = _volume()
    model = Conv()
    ref, _ = reconstruct.reconstruct_volume(model, image, mask)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    recon, anomaly = reconstruct.reconstruct_volume(model, image, mask, amp="bf16")
    assert recon.dtype == anomaly.dtype == np.float32
    assert 0 < np.abs(recon - ref).max() <= 2 ** -8 * np.abs(ref).max()
    np.testing.assert_allclose(anomaly, np.abs(image - recon), atol=1e-6)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="float32"):
        same, _ = reconstruct.reconstruct_volume(model, image, mask, amp="bf16")
    np.testing.assert_array_equal(same, ref)


def test_reconstructions_in_another_precision_are_not_reused(tmp_path, monkeypatch):
    from cddpm_lib import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    rows, out, model = _rows(tmp_path), tmp_path / "recon", FakeDiffusion()
    assert reconstruct.recon_key(model, 1, {"t_test": 500}, "bf16") != reconstruct.recon_key(model, 1, {"t_test": 500})
    reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, t_test=500)
    assert not reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, amp="bf16", t_test=500)["reused"].any()
    assert reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, amp="bf16", t_test=500)["reused"].all()
    # asked for bf16 where it cannot run: the float32 reconstruction it would compute is the one on disk
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, t_test=500)
    logged = []
    with pytest.warns(RuntimeWarning, match="running in float32") as said:
        assert reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, amp="bf16", t_test=500,
                                               log=logged.append)["reused"].all()
    assert len(said) == 1 and len(logged) == 1 and "float32" in logged[0]  # once for the set, not per volume


def _rows(tmp_path, n=2):
    rows = []
    for i in range(n):
        image, mask = _volume(seed=i)
        seg = (image > 0.9).astype(np.uint8)
        d = tmp_path / "vols" / f"s{i}"
        rows.append({"dataset": "BraTS21", "subject_id": f"s{i}",
                     "t2": str(save_nifti(image, np.diag([2, 2, 2, 1]), d / "t2.nii.gz")),
                     "brain_mask": str(save_nifti(mask, np.eye(4), d / "mask.nii.gz", dtype=np.uint8)),
                     "seg": str(save_nifti(seg, np.eye(4), d / "seg.nii.gz", dtype=np.uint8)) if i else ""})
    return pd.DataFrame(rows)


def test_reconstruct_dataset_writes_and_resumes(tmp_path):
    rows = _rows(tmp_path)
    out = tmp_path / "recon"
    first = reconstruct.reconstruct_dataset(Affine(), rows, "t2", out, max_batch=4)
    assert list(first["reused"]) == [False, False] and (first["seconds"] > 0).all()
    z = load_npz(out / "s1.npz")
    assert set(reconstruct.NPZ_KEYS) <= set(z) and z["affine"][0, 0] == 2
    assert z["seg"].dtype == np.uint8 and load_npz(out / "s0.npz")["seg"].sum() == 0  # no annotation -> zeros
    mtime = (out / "s1.npz").stat().st_mtime_ns
    again = reconstruct.reconstruct_dataset(Affine(), rows, "t2", out, max_batch=4)
    assert list(again["reused"]) == [True, True] and (out / "s1.npz").stat().st_mtime_ns == mtime
    assert again["seconds"].tolist() == pytest.approx(first["seconds"].tolist())
    (out / "s0.npz").write_bytes(b"broken")
    third = reconstruct.reconstruct_dataset(Affine(), rows, "t2", out, max_batch=4)
    assert list(third["reused"]) == [False, True] and reconstruct.is_valid_recon(out / "s0.npz")


def test_saved_reconstructions_are_reused_only_for_the_same_weights_and_seed(tmp_path):
    rows, out = _rows(tmp_path), tmp_path / "recon"
    model = FakeDiffusion()
    reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, t_test=500)
    first = str(load_npz(out / "s1.npz")["key"])
    assert reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, t_test=500)["reused"].all()
    # the same weights loaded into another instance: still the same reconstruction
    twin = FakeDiffusion()
    twin.load_state_dict(model.state_dict())
    assert reconstruct.reconstruct_dataset(twin, rows, "t2", out, seed=1, t_test=500)["reused"].all()
    # another seed, other settings, retrained weights or other hyper-parameters: computed again
    for m, kw in ((model, {"seed": 2, "t_test": 500}), (model, {"seed": 1, "t_test": 250}),
                  (FakeDiffusion(a=0.7), {"seed": 1, "t_test": 500}),
                  (FakeDiffusion(b=0.3), {"seed": 1, "t_test": 500})):
        assert not reconstruct.reconstruct_dataset(m, rows, "t2", out, **kw)["reused"].any()
    with torch.no_grad():
        model.a.mul_(2.0)  # trained further in place
    again = reconstruct.reconstruct_dataset(model, rows, "t2", out, seed=1, t_test=500)
    assert not again["reused"].any()
    assert str(load_npz(out / "s1.npz")["key"]) != first


def test_missing_weighting_column_is_reported(tmp_path):
    with pytest.raises(ValueError, match="'t1'"):
        reconstruct.reconstruct_dataset(Affine(), _rows(tmp_path, 1), "t1", tmp_path / "r")


def test_time_volumes_counts_each_volume():
    image, mask = _volume()
    assert len(reconstruct.time_volumes(Affine(), [image, image], [mask, mask], warmup=1)) == 2


@pytest.mark.parametrize("name", ["ddpm", "pddpm"])
def test_ensemble_from_saved_parts_equals_one_ensemble_call(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(name, image_size=(8, 6), model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        num_heads=2).eval()
    with torch.no_grad():  # the output layer starts at zero: give every weight a value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows, ens = _rows(tmp_path), reconstruct.variant_kwargs("ens")
    parts = {t: tmp_path / v for t, v in reconstruct.ensemble_part_variants("ens").items()}
    direct = reconstruct.reconstruct_dataset(model, rows, "t2", tmp_path / "direct", seed=3, max_batch=4, **ens)
    derived = reconstruct.reconstruct_dataset(model, rows, "t2", tmp_path / "ens", seed=3, max_batch=4, parts=parts,
                                              **ens)
    single = reconstruct.reconstruct_dataset(model, rows, "t2", tmp_path / "single", seed=3, t_test=500)
    for sid in ("s0", "s1"):
        a, b = load_npz(tmp_path / "direct" / f"{sid}.npz"), load_npz(tmp_path / "ens" / f"{sid}.npz")
        np.testing.assert_allclose(b["recon"], a["recon"], atol=1e-5)
        np.testing.assert_allclose(b["anomaly"], a["anomaly"], atol=1e-5)
        np.testing.assert_allclose(load_npz(parts[500] / f"{sid}.npz")["recon"],
                                   load_npz(tmp_path / "single" / f"{sid}.npz")["recon"], atol=1e-5)
    part_seconds = sum(float(load_npz(parts[t] / "s0.npz")["seconds"]) for t in parts)
    assert derived["seconds"].iloc[0] == pytest.approx(part_seconds)
    assert not direct["reused"].any() and not single["reused"].any()
    # the ensemble file lost: rebuilt from the saved parts without a single network pass
    (tmp_path / "ens" / "s0.npz").unlink()
    calls = []
    model.reconstruct = lambda *a, **k: calls.append(1)
    again = reconstruct.reconstruct_dataset(model, rows, "t2", tmp_path / "ens", seed=3, parts=parts, **ens)
    assert not calls and list(again["reused"]) == [False, True]
    np.testing.assert_allclose(load_npz(tmp_path / "ens" / "s0.npz")["recon"],
                               load_npz(tmp_path / "direct" / "s0.npz")["recon"], atol=1e-5)


def test_ensemble_part_variants():
    assert reconstruct.ensemble_part_variants("ens") == {250: "t250", 500: "t500", 750: "t750"}
    assert reconstruct.ensemble_part_variants("ens_contrast0.5")[750] == "t750_contrast0.5"
    assert reconstruct.ensemble_part_variants("t500") == {} == reconstruct.ensemble_part_variants("default")
