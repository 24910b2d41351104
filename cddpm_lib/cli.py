"""Command line: ``cddpm-uad reproduce | validate | score``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import paths
from .config import AMPS, ConfigError

DESCRIPTION = ("cDDPM reproduction kit (Behrendt et al. 2023): reproduce the paper's tables and figures, check a "
               "data manifest, or score a scan with a trained model. `cddpm-uad COMMAND --help` for each command.")


def _parse_set(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set stage.param=value`` (value parsed as YAML) -> ``{stage: {param: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected STAGE.PARAM=VALUE, e.g. training.max_steps=200")
        lhs, value = item.split("=", 1)
        stage, param = lhs.split(".", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value {value!r} is not valid YAML ({first}); quote text, "
                              "write lists as [1, 2] and mappings as {key: value}") from None
        out.setdefault(stage, {})[param] = parsed
    return out


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, run_pipeline

    try:
        run_pipeline(args.profile, jobs=args.jobs, force=args.force or (), only=args.only,
                     overrides=_parse_set(args.set or ()))
    except (PipelineError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .manifests import load_manifest, validate_manifest

    root = Path(args.root) if args.root else None
    try:
        df = load_manifest(args.manifest, root=root)
    except (ValueError, FileNotFoundError, paths.SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = validate_manifest(df)
    if problems:
        print(f"{len(problems)} problem(s) in {args.manifest}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.manifest}: {len(df)} rows, all files present and consistent")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .scoring import ScoringError, score_scan

    try:
        out = score_scan(Path(args.scan), Path(args.checkpoint), Path(args.output), weighting=args.weighting,
                         threshold=args.threshold, threshold_dataset=args.threshold_dataset, t_test=args.t_test,
                         device=args.device, skull_stripped=args.skull_stripped, profile=args.profile,
                         t1=Path(args.t1) if args.t1 else None, overwrite=args.overwrite,
                         amp=args.amp)
    except ScoringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in out.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import STAGES

    p = argparse.ArgumentParser(prog="cddpm-uad", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reproduce", help="run the paper's pipeline (papermill DAG) and build the report")
    r.add_argument("--profile", default="quick", choices=paths.PROFILES,
                   help="smoke: tiny cohort, minutes (the tests' plumbing check); quick (default): every table and "
                        "figure on the synthetic cohort, sized for a 2-core CPU; paper: the paper's settings on the "
                        "real data sets, for a GPU")
    stages = ", ".join(STAGES)
    r.add_argument("-j", "--jobs", type=int, default=1,
                   help="SSL and training runs (folds, models) side by side (default: 1; `make reproduce` passes 2)")
    r.add_argument("--force", action="append", metavar="STAGE", help=f"rerun STAGE even if up to date ({stages})")
    r.add_argument("--only", action="append", metavar="STAGE", help=f"run only these stages ({stages})")
    r.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE",
                   help="override a notebook parameter, e.g. training.max_steps=2000 or data.split=leak_free "
                        "(VALUE read as YAML); an unknown stage or parameter is an error")
    r.set_defaults(func=cmd_reproduce)

    v = sub.add_parser("validate", help="check a manifest's files; lists all problems at once")
    v.add_argument("manifest")
    v.add_argument("--root", help="folder the manifest's relative paths are resolved against (default: "
                                  "$CDDPM_REAL_DATA for the shipped data_manifests/*.csv, which then must be set; "
                                  "the manifest's own folder for any other manifest)")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("score", help="anomaly map and segmentation of one scan with a trained model")
    s.add_argument("scan", help="NIfTI scan (T1 or T2, raw or skull-stripped)")
    s.add_argument("--checkpoint", required=True, help="best.pt written by the training stage")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--weighting", choices=("t1", "t2"), required=True, help="weighting of the scan")
    s.add_argument("--threshold", type=float, default=None,
                   help="residual threshold (default: the one chosen on validation, from the run's results)")
    s.add_argument("--threshold-dataset", default=None, metavar="DATASET",
                   help="whose validation threshold to use when the run chose one per data set "
                        "(T2: BraTS21 or MSLUB; T1: ATLAS or WMH)")
    s.add_argument("--t-test", type=int, nargs="+", default=None, help="diffusion t_test (several = ensemble)")
    s.add_argument("--t1", default=None, metavar="T1_SCAN",
                   help="the T1 scan of the same session as a T2 scan: the T2 is then registered and skull-stripped "
                        "through it, exactly as the training data (without it, on its own)")
    s.add_argument("--skull-stripped", action="store_true", help="the scan is already skull-stripped")
    s.add_argument("--overwrite", action="store_true", help="allow an output folder that already holds files")
    s.add_argument("--profile", choices=paths.PROFILES, default=None,
                   help="preprocessing/post-processing settings (default: the checkpoint's run profile)")
    s.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    s.add_argument("--amp", choices=AMPS, default=None,
                   help="mixed precision of the reconstruction (default: the one the threshold was chosen on, else "
                        "the one the segmentation stage used for this model, else the segmentation profile's, "
                        "none); bf16 on CUDA or an AVX-512 CPU, fp16 on CUDA")
    s.set_defaults(func=cmd_score)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
