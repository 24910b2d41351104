"""Content fingerprints: what a saved result was computed from, so that caches and resumption notice a change.

- :func:`module_fingerprint` — SHA-1 of a network's class and state (parameters and buffers, names, dtypes,
  shapes and bytes). Two checkpoints with the same weights have the same fingerprint wherever they were loaded
  from; it is memoised per module until one of its tensors is modified in place, moved or replaced.
- :func:`tensors_fingerprint` — SHA-1 of a sequence of tensors or arrays (e.g. the volumes of a training cohort).
- :func:`file_fingerprint` — SHA-1 of a file's bytes (e.g. the SparK encoder a cDDPM+SSL run starts from).
- :func:`record_fingerprint` — SHA-1 of a JSON-able record (e.g. model fingerprint + seed + test-time settings).

Reconstructions (:func:`cddpm_lib.reconstruct.reconstruct_cached`) store the fingerprint of the model, seed and
settings that produced them and are reused only when all match; training (:func:`cddpm_lib.engine.fit`) resumes
or reuses a run only when its data and inputs (e.g. a re-run SparK encoder) are the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

_MEMO: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _update(h, tensor: torch.Tensor | np.ndarray) -> None:
    t = torch.as_tensor(tensor).detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_fingerprint(tensors: Iterable[torch.Tensor | np.ndarray]) -> str:
    """SHA-1 (hex) of the dtypes, shapes and bytes of ``tensors`` in order."""
    h = hashlib.sha1()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def _state_key(state: dict[str, torch.Tensor]) -> tuple:
    # a tensor modified in place bumps its version counter (shared with the state dict's detached views); a moved
    # or replaced tensor has another storage
    return tuple((name, t.data_ptr(), t._version, t.device.type) for name, t in state.items())


def module_fingerprint(module: nn.Module) -> str:
    """SHA-1 (hex) of ``module``'s class and ``state_dict`` (every parameter and buffer)."""
    state = module.state_dict()
    key = _state_key(state)
    memo = _MEMO.get(module)
    if memo is not None and memo[0] == key:
        return memo[1]
    h = hashlib.sha1(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in state.items():
        h.update(name.encode())
        _update(h, t)
    digest = h.hexdigest()
    _MEMO[module] = (key, digest)
    return digest


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-1 (hex) of a file's bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_fingerprint(record: Any) -> str:
    """SHA-1 (hex) of a JSON-able record (keys sorted; other values by ``repr``)."""
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=repr).encode()).hexdigest()
