"""Speed benchmarks of the kit; each ``bench_*`` module writes its section of ``BENCHMARKS.md``."""
from __future__ import annotations

from pathlib import Path


def write_section(path: Path, lines: list[str]) -> Path:
    """Write one benchmark's Markdown section (``benchmarks/results/<topic>.md``) and print where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(path)
    return path
