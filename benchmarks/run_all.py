"""Run every benchmark (``benchmarks/bench_*.py``) and assemble ``BENCHMARKS.md`` from their result sections.

``python -m benchmarks.run_all`` runs them all; ``python -m benchmarks.run_all --assemble`` only rebuilds
``BENCHMARKS.md`` from ``benchmarks/results/*.md`` (each benchmark writes its own section there).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = ("preprocessing", "noise", "unet", "amp", "training", "cpu", "metrics")


def _rank(section: Path) -> tuple[int, str]:
    """Order of a result section: by topic (``unet_cuda_bf16_cl`` right after ``unet``), unknown topics last."""
    topic = section.stem.split("_")[0]
    return (ORDER.index(topic) if topic in ORDER else len(ORDER), section.stem)


def assemble() -> Path:
    sections = sorted(RESULTS.glob("*.md"), key=_rank)
    head = [
        "# Benchmarks",
        "",
        "Speed and memory of the kit, measured against a reference implementation **in the same run** on the same",
        "machine (ratios, not absolute times, are what carries over). Regenerate with `make bench`",
        "(or one benchmark: `.venv/bin/python -m benchmarks.bench_<topic>`). Timings are never asserted in tests.",
        "Each section is measured on its own (its command heads it) and may come from another host of the same",
        "kind: compare ratios within a section, not absolute times across sections.",
        "",
        f"Assembled {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores.",
        "",
    ]
    body = [p.read_text().strip() + "\n" for p in sections]
    out = HERE.parent / "BENCHMARKS.md"
    out.write_text("\n".join(head) + "\n" + "\n".join(body))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assemble", action="store_true", help="only rebuild BENCHMARKS.md")
    args = ap.parse_args(argv)
    if not args.assemble:
        for bench in sorted(HERE.glob("bench_*.py")):  # CPU; GPU sections: make bench-gpu
            print(f"== {bench.stem}", flush=True)
            subprocess.run([sys.executable, "-m", f"benchmarks.{bench.stem}"], cwd=HERE.parent, check=True)
    print(assemble())
    return 0


if __name__ == "__main__":
    sys.exit(main())
