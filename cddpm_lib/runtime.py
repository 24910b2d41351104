"""Device choice, mixed precision (which one runs where, autocast), seeding, the CPU memory allocator and worker
pools that exit with their parent, shared by every stage."""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import warnings

import numpy as np
import torch

from .config import AMPS


def default_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other string is passed to ``torch.device`` (a string it does
    not know is a ``ValueError`` naming the parameter)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"parameter 'device': {requested!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def cpu_bf16_supported() -> bool:
    """True when oneDNN runs bfloat16 convolutions and matrix products on this CPU (AVX-512 or newer: what
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` reports).

    Where it does, ``amp="bf16"`` trains and reconstructs on the CPU under ``torch.autocast("cpu", bfloat16)``:
    measured at the paper width on one core with AVX-512-BF16 instructions about 1.9× as fast as float32
    (``BENCHMARKS.md``; AVX-512 cores without them convert in software, unmeasured here). On older CPUs PyTorch
    would fall back to slow reference kernels, so the kit then stays in float32.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an operator this torch build does not carry
        return False


def effective_amp(amp: str, device: torch.device) -> tuple[str, str | None]:
    """The mixed precision ``amp`` (``none``, ``bf16``, ``fp16``) that runs on ``device``, and why it differs.

    CUDA: as asked. CPU: ``bf16`` where :func:`cpu_bf16_supported`, float32 otherwise; ``fp16`` is CUDA only
    (float16 on a CPU is neither faster nor safe without loss scaling). Returns ``(amp, note)``; ``note`` is
    ``None`` when ``amp`` runs as asked, else a sentence saying what runs instead.
    """
    if amp not in AMPS:
        raise ValueError(f"amp must be one of {AMPS}, got {amp!r}")
    if amp == "none" or device.type == "cuda" or (amp == "bf16" and device.type == "cpu" and cpu_bf16_supported()):
        return amp, None
    why = ("needs a CUDA device" if amp == "fp16" or device.type != "cpu"
           else "needs a CPU on which oneDNN runs bfloat16 (AVX-512 or newer) or a CUDA device")
    return "none", f"amp={amp!r} {why}; running in float32 on {device}"


def stage_amp(amp: str, device: torch.device, log=None, where: str = "") -> str:
    """The precision a stage runs (:func:`effective_amp`), a fallback said once: through ``log`` (a stage's
    log, ``where`` its tag, e.g. ``[quality]``), or as a :class:`RuntimeWarning` when there is no log."""
    amp, note = effective_amp(amp, device)
    if note:
        if log is not None:
            log(f"{where + ' ' if where else ''}warning: {note}")
        else:
            warnings.warn(f"{where + ' ' if where else ''}{note}", RuntimeWarning, stacklevel=2)
    return amp


def autocast(amp: str, device: torch.device):
    """The mixed-precision context of ``amp`` (``none``: float32, no context) on ``device``."""
    if amp not in AMPS:
        raise ValueError(f"amp must be one of {AMPS}, got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """In a worker process: exit as soon as the process that started it is gone.

    A pipeline stopped from outside (``kill``, a scheduler's time limit) ends its notebook kernels, but the
    kernels' worker pools (preprocessing, cohort generation) would be left running with nobody to collect their
    results. A daemon thread polls the parent's pid and ends the worker (``os._exit``) when it changes, which is
    what happens when the parent dies and the worker is handed to another process. Use it as (or in) a pool's
    ``initializer``.
    """
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


#: glibc ``mallopt`` parameters (``<malloc.h>``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: the environment switch of :func:`keep_freed_memory` (``0`` turns it off)
KEEP_HEAP_ENV = "CDDPM_KEEP_HEAP"
_heap_kept: bool | None = None


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc's ``malloc`` keep freed memory in the process for reuse (process-wide, permanent, idempotent).

    A CPU training step or reconstruction allocates and frees the same activation buffers again and again. By
    default glibc hands large freed blocks back to the operating system (``mmap`` above ``M_MMAP_THRESHOLD``,
    heap trimming above ``M_TRIM_THRESHOLD``) and page-faults them in afresh on the next pass. Raising both
    thresholds to ``limit`` bytes keeps them: the process then holds on to its peak heap, as PyTorch's CUDA caching
    allocator holds GPU memory, and the peak itself can grow a little (blocks of different sizes fragment the heap).
    Measured at the quick size on one thread (``benchmarks/bench_cpu.py``, ``BENCHMARKS.md``): a cDDPM training
    step 1.06× and an ensemble reconstruction 1.25× as fast, peak resident memory +2 % and +20 %.

    :func:`cddpm_lib.engine.fit` and :func:`cddpm_lib.reconstruct.reconstruct_volume` call it on a CPU. Returns
    whether the setting is in effect: ``False`` with another C library (nothing changes) or when the environment
    sets ``CDDPM_KEEP_HEAP=0``. Only the first call acts; later ones return its result.
    """
    global _heap_kept
    if _heap_kept is None:
        _heap_kept = False
        if os.environ.get(KEEP_HEAP_ENV, "1").strip() not in ("0", "false", "no", "off"):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version"):  # glibc: mallopt takes these parameters
                    _heap_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(limit))
                                      and libc.mallopt(_M_TRIM_THRESHOLD, int(limit)))
            except (OSError, AttributeError):
                pass
    return _heap_kept
