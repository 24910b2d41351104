"""runtime: device choice, seeding and the CPU allocator setting (each allocator check in a fresh process)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cddpm_lib import runtime

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

#: training steps of a small U-Net in a fresh process; prints the setting's result, the minor page faults per step
#: and the process's own peak resident set in MiB (``VmHWM``; ``ru_maxrss`` would carry pytest's over the fork)
_CHILD = """
import resource, sys, torch
from cddpm_lib import runtime
from cddpm_lib.unet import UNet
torch.set_num_threads(1)
kept = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
net = UNet(model_channels=8, channel_mult=(1, 2), num_res_blocks=1)
x, t = torch.rand(8, 1, 64, 64), torch.randint(1, 1000, (8,))
def step():
    net.zero_grad(set_to_none=True)
    (net(x, t) - x).abs().mean().backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # kB, own peak
print(kept, faults, peak // 1024)
"""


def _child(mode: str, **env: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not GLIBC, reason="the setting acts on glibc's malloc only")
def test_keep_freed_memory_stops_page_faults_at_the_same_peak_memory():
    """Each step frees and reallocates the same activation buffers: by default glibc returns them to the system
    and faults them in again; kept, a step reuses them, and the process peaks no higher."""
    kept, faults_kept, peak_kept = _child("keep")
    _, faults_default, peak_default = _child("default")
    assert kept == "True"
    assert faults_default > 2000
    assert faults_kept * 5 < faults_default
    assert peak_kept <= 1.15 * peak_default


@pytest.mark.skipif(not GLIBC, reason="the setting acts on glibc's malloc only")
def test_keep_freed_memory_can_be_switched_off():
    kept, faults, _ = _child("keep", **{runtime.KEEP_HEAP_ENV: "0"})
    assert kept == "False"
    assert faults > 2000


def test_default_device_and_seeding():
    assert runtime.default_device("cpu") == torch.device("cpu")
    assert runtime.default_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    runtime.seed_everything(3)
    a = torch.rand(4)
    runtime.seed_everything(3)
    assert torch.equal(a, torch.rand(4))


_ORPHAN_PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from cddpm_lib.runtime import exit_with_parent
pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=partial(exit_with_parent, 0.2))
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 120)
time.sleep(0.5)
os._exit(0)  # the parent dies without shutting its pool down (a killed kernel)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited already


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_pool_workers_exit_when_their_parent_dies():
    import time

    out = subprocess.run([sys.executable, "-c", _ORPHAN_PARENT], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    worker = int(out.stdout.split()[0])
    deadline = time.time() + 20
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), "the pool worker outlived its parent"


def test_effective_amp_on_cpu_follows_native_bfloat16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.effective_amp("none", cpu) == ("none", None)
    assert runtime.effective_amp("fp16", cuda) == ("fp16", None) and runtime.effective_amp("bf16", cuda)[0] == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    assert runtime.effective_amp("bf16", cpu) == ("bf16", None)
    amp, note = runtime.effective_amp("fp16", cpu)
    assert amp == "none" and "fp16" in note and "CUDA" in note
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    amp, note = runtime.effective_amp("bf16", cpu)
    assert amp == "none" and "oneDNN runs bfloat16" in note and "float32" in note
    with pytest.raises(ValueError, match="'bf32'"):
        runtime.effective_amp("bf32", cpu)


def test_cpu_bf16_support_is_false_without_onednn_or_its_operator(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert runtime.cpu_bf16_supported() is False
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops, "mkldnn", object())  # a torch build without the operator
    assert runtime.cpu_bf16_supported() is False


def test_autocast_runs_convolutions_in_bfloat16_on_cpu():
    conv, x = torch.nn.Conv2d(1, 2, 3), torch.rand(1, 1, 5, 5)
    with runtime.autocast("bf16", torch.device("cpu")):
        assert conv(x).dtype == torch.bfloat16
    with runtime.autocast("none", torch.device("cpu")):
        assert conv(x).dtype == torch.float32


def test_stage_amp_says_a_fallback_once_through_the_log_or_as_a_warning(monkeypatch):
    import warnings

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    said = []
    assert runtime.stage_amp("bf16", cpu, said.append, "[quality]") == "none"
    assert len(said) == 1 and said[0].startswith("[quality] warning: amp='bf16'") and "float32" in said[0]
    with pytest.warns(RuntimeWarning, match="float32"):
        assert runtime.stage_amp("bf16", cpu) == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.stage_amp("none", cpu, said.append) == "none" and len(said) == 1  # as asked: silent
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    assert runtime.stage_amp("bf16", cpu, said.append) == "bf16" and len(said) == 1


def test_bad_device_or_precision_names_the_value():
    with pytest.raises(ValueError, match=r"parameter 'device': 'gpu' is not a device"):
        runtime.default_device("gpu")
    with pytest.raises(ValueError, match="amp must be one of .*'bf61'"):
        runtime.autocast("bf61", torch.device("cpu"))
