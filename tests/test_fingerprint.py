"""fingerprint: content hashes of networks, tensors, files and records (caches and resumption)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from cddpm_lib import fingerprint


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))


def test_module_fingerprint_follows_the_weights_not_the_instance():
    a, b = _net(0), _net(0)
    assert fingerprint.module_fingerprint(a) == fingerprint.module_fingerprint(b)
    assert fingerprint.module_fingerprint(_net(1)) != fingerprint.module_fingerprint(a)
    before = fingerprint.module_fingerprint(a)
    with torch.no_grad():
        a[0].weight[0, 0, 0, 0] += 1e-3  # in place: the memo must notice
    assert fingerprint.module_fingerprint(a) != before
    b[1].running_mean.fill_(0.5)  # buffers count as well
    assert fingerprint.module_fingerprint(b) != before
    c = _net(0)
    assert fingerprint.module_fingerprint(c) == before  # memoised now
    c[0].weight = torch.nn.Parameter(c[0].weight.detach() * 2)  # replaced tensor: the memo must notice
    assert fingerprint.module_fingerprint(c) != before


def test_tensors_fingerprint_sees_dtype_shape_and_bytes():
    x = np.arange(6, dtype=np.float32)
    base = fingerprint.tensors_fingerprint([x])
    assert base == fingerprint.tensors_fingerprint([torch.from_numpy(x.copy())])
    assert base != fingerprint.tensors_fingerprint([x.reshape(2, 3)])
    assert base != fingerprint.tensors_fingerprint([x.astype(np.float64)])
    assert fingerprint.tensors_fingerprint([torch.tensor(1.0), torch.zeros(2, dtype=torch.bool),
                                            torch.ones(2, dtype=torch.bfloat16)])  # 0-d, bool, bf16 all hash


def test_file_and_record_fingerprints(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 3_000_000)
    assert fingerprint.file_fingerprint(f) == hashlib.sha1(b"x" * 3_000_000).hexdigest()
    assert fingerprint.record_fingerprint({"a": 1, "b": [2]}) == fingerprint.record_fingerprint({"b": [2], "a": 1})
    assert fingerprint.record_fingerprint({"a": 1}) != fingerprint.record_fingerprint({"a": 2})
