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


def interleaved_processes(worker: Callable, variants: Sequence[Hashable], rounds: int, steps: int,
                          args_of: Callable[[Hashable], tuple]) -> dict[Hashable, list[dict[str, Any]]]:
    """Paired timing: per round, one fresh (spawned) process per variant, all alive together, taking turns.

    ``worker(*args_of(variant), conn)`` prepares its workload (untimed, the processes in parallel), sends
    ``"ready"``, then answers each ``"step"`` with one measurement and ``"stop"`` with a final summary. The parent
    asks the variants for one step each, ``steps`` times, the order reversed every turn and every round
    (A B, B A, ...), so step ``i`` of every variant ran back to back, under the same load of the moment: the
    slow drifts of a shared machine cancel in per-step ratios, which process-level alternation cannot do. Each
    variant keeps a process of its own (no shared allocator or cache state).

    Returns ``{variant: [{"steps": [measurement per step], "summary": ...} per round]}``; measurements pair up by
    (round, step).
    """
    ctx = mp.get_context("spawn")
    results: dict[Hashable, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        procs = {}
        for variant in variants:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(*args_of(variant), child))
            proc.start()
            child.close()
            procs[variant] = (proc, parent)

        def ask(variant, message):
            proc, conn = procs[variant]
            try:
                if message is not None:
                    conn.send(message)
                return conn.recv()
            except (EOFError, OSError) as err:
                raise RuntimeError(f"benchmark worker for {variant!r} (round {r + 1}) stopped without answering "
                                   f"{message or 'ready'!r} (exit code {proc.exitcode})") from err

        try:
            for variant in variants:
                if ask(variant, None) != "ready":
                    raise RuntimeError(f"benchmark worker for {variant!r} did not report ready")
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            measured: dict[Hashable, list[Any]] = {v: [] for v in variants}
            for i in range(steps):
                for variant in (order if i % 2 == 0 else order[::-1]):
                    measured[variant].append(ask(variant, "step"))
            for variant in variants:
                results[variant].append({"steps": measured[variant], "summary": ask(variant, "stop")})
        finally:
            for proc, conn in procs.values():
                conn.close()
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
    return results
