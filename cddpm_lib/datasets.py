"""The data sets of the paper (Table 1) and which weighting each is evaluated on."""
from __future__ import annotations

#: healthy training/validation/test cohort
HEALTHY = "IXI"
#: unhealthy evaluation sets, in the paper's column order
UNHEALTHY = ("BraTS21", "MSLUB", "ATLAS", "WMH")
DATASETS = (HEALTHY, *UNHEALTHY)
WEIGHTINGS = ("t2", "t1")
#: models trained on IXI T2 are evaluated on BraTS21 and MSLUB; IXI T1 models on ATLAS and WMH (paper §4.1)
EVAL_SETS: dict[str, tuple[str, ...]] = {"t2": ("BraTS21", "MSLUB"), "t1": ("ATLAS", "WMH")}
WEIGHTING_OF: dict[str, str] = {d: w for w, sets in EVAL_SETS.items() for d in sets}
#: paper Table 1: (healthy train, healthy val, healthy test, unhealthy val, unhealthy test)
PAPER_SIZES: dict[str, dict[str, int]] = {
    "IXI": {"train": 358, "val": 44, "test": 158},
    "BraTS21": {"val": 100, "test": 1151},
    "MSLUB": {"val": 10, "test": 20},
    "ATLAS": {"val": 175, "test": 480},
    "WMH": {"val": 15, "test": 45},
}


def model_id(model: str, weighting: str, ssl: bool = False) -> str:
    """Run identifier of a trained model, e.g. ``cddpm-ssl_t2`` (folder name under ``checkpoints/``)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")
    return f"{model}{'-ssl' if ssl else ''}_{weighting}"
