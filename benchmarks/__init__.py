"""Speed benchmarks of the kit; each ``bench_*`` module writes its section of ``BENCHMARKS.md``."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence


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


def alternating_processes(worker: Callable, variants: Sequence[Hashable], rounds: int,
                          args_of: Callable[[Hashable], tuple]) -> dict[Hashable, list[Any]]:
    """``worker(*args_of(variant), queue)`` in a fresh (spawned) process per variant and round, the variants' order
    reversed every other round so that drifting load hits all alike; ``{variant: [what each process put]}``."""
    ctx = mp.get_context("spawn")
    results: dict[Hashable, list[Any]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            out = ctx.Queue()
            proc = ctx.Process(target=worker, args=(*args_of(variant), out))
            proc.start()
            results[variant].append(out.get())
            proc.join()
    return results
