"""The paired process timing behind the U-Net benchmark (``benchmarks.interleaved_processes``)."""
from __future__ import annotations

import os
import time

import pytest

from benchmarks import interleaved_processes


def _clock_worker(name: str, fail_at: int, conn) -> None:
    conn.send("ready")
    done = 0
    while conn.recv() == "step":
        if done == fail_at:
            raise SystemExit(3)
        done += 1
        conn.send((name, os.getpid(), time.monotonic_ns()))
    conn.send(("summary", name, done))


def test_variants_take_turns_step_by_step_in_fresh_processes():
    runs = interleaved_processes(_clock_worker, ("a", "b"), rounds=2, steps=3, args_of=lambda v: (v, -1))
    assert set(runs) == {"a", "b"} and all(len(r) == 2 for r in runs.values())
    pids = {pid for v in runs for r in runs[v] for _, pid, _ in r["steps"]}
    assert len(pids) == 4  # one process per variant and round
    for rnd in range(2):
        a, b = runs["a"][rnd], runs["b"][rnd]
        assert a["summary"] == ("summary", "a", 3) and b["summary"] == ("summary", "b", 3)
        first = ["a" if sa[2] < sb[2] else "b" for sa, sb in zip(a["steps"], b["steps"])]
        # A B, B A, A B in the first round; the mirror image in the second
        assert first == (["a", "b", "a"] if rnd == 0 else ["b", "a", "b"])
        # the two steps of a pair ran back to back: no other step of the round between them
        stamps = sorted((s[2], v, i) for v in "ab" for i, s in enumerate(runs[v][rnd]["steps"]))
        assert [i for _, _, i in stamps] == [0, 0, 1, 1, 2, 2]


def test_a_worker_that_dies_is_named():
    with pytest.raises(RuntimeError, match=r"worker for 'b' \(round 1\).*'step'.*exit code"):
        interleaved_processes(_clock_worker, ("a", "b"), rounds=1, steps=2,
                              args_of=lambda v: (v, 1 if v == "b" else -1))


def test_conv_flops_count_forward_and_the_gradients_a_step_computes():
    import torch

    from benchmarks.bench_unet import conv_flops

    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    forward = 2 * (2 * 5 * 8 * 8) * 3 * 3 * 3  # two operations per multiply-add, per output element and tap
    image = torch.rand(2, 3, 8, 8)
    assert conv_flops(conv, (image,), conv(image)) == 2 * forward  # the image needs no gradient
    feature = image.clone().requires_grad_()
    assert conv_flops(conv, (feature,), conv(feature)) == 3 * forward
    strided = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    assert conv_flops(strided, (feature,), strided(feature)) == 3 * forward / 4  # a quarter of the outputs
    grouped = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)  # each output sees 2 of the 4 input channels
    wide = torch.rand(2, 4, 8, 8, requires_grad=True)
    assert conv_flops(grouped, (wide,), grouped(wide)) == 3 * 2 * (2 * 6 * 8 * 8) * 2 * 3 * 3


def test_split_row_shares_rates_and_ceiling():
    from benchmarks.bench_unet import split_row

    split = {"kit": (9.0, 1.0, 900e9), "monai": (11.0, 2.0, 900e9)}
    cells = [c.strip() for c in split_row("paper", split).strip("|").split("|")]
    assert cells[0] == "paper" and cells[1] == "900.0 / 900.0"
    assert cells[4] == "90 % / 85 %"  # convolution share of each network's operator time
    assert cells[5] == "100 / 82"  # GFLOP/s
    assert cells[6] == "1.22" and cells[7] == "2.00"  # MONAI / kit, convolutions and the rest
    assert cells[8] == "1.20"  # (mean convolution 10 + MONAI's rest 2) / 10


def test_profiler_keys_of_convolutions_are_told_from_the_rest():
    from benchmarks.bench_unet import _is_convolution

    for key in ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                "aten::_slow_conv2d_backward", "aten::conv2d", "autograd::engine::evaluate_function: "
                "ConvolutionBackward0"):
        assert _is_convolution(key), key
    for key in ("aten::native_group_norm", "aten::silu_backward", "aten::mm", "aten::cat", "aten::copy_",
                "Optimizer.step#Adam.step", "aten::_scaled_dot_product_flash_attention_for_cpu"):
        assert not _is_convolution(key), key
