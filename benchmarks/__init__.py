"""Speed benchmarks of the kit; each ``bench_*`` module writes its section of ``BENCHMARKS.md``."""
from __future__ import annotations

from pathlib import Path


def write_section(path: Path, lines: list[str]) -> Path:
    """Write one benchmark's Markdown section (``benchmarks/results/<topic>.md``) and print where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(path)
    return path


def proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` in bytes (Linux): ``VmRSS`` (resident now), ``VmHWM`` (peak resident
    since the process started or since ``/proc/self/clear_refs`` was written ``5``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"/proc/self/status has no {field}")
