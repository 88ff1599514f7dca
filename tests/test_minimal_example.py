"""examples/minimal.py (the seed post's experiment) at a size that runs in seconds.

The short run keeps the example's recipe (Adam lr 1e-3, batch 128, r=1, alpha=1, init="normal",
target Θ+1) and shrinks the layer, so that it still takes enough optimizer steps to converge:
Adam moves each weight by about lr per step, so convergence needs thousands of steps whatever
the width, while a step on a small layer is cheap. One thread: at this size a second one
buys nothing and, on a busy machine, makes the run several times slower.

Thresholds were set from seeds 0-4 of the short run (worst case in brackets) with wide margins.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minimal.py"

# The short version: n // 128 = 15 steps per epoch, 6,000 steps per phase (the full run: 7,800).
N, D_IN, D_OUT, EPOCHS, SEED = 2000, 33, 32, 400, 0

PRETRAIN_DROP = 1e-3    # final / initial whole-data MSE, pre-training      [3.5e-5]
LORA_DROP = 1e-3        # final / initial whole-data MSE, LoRA fine-tuning  [4.1e-5]
DELTA_TOL = 0.1         # max |ΔW - 1| of the merged update                  [0.0103]
MERGE_OUT_TOL = 1e-4    # max |merged - unmerged| output; outputs reach ~40, fp32 ulp there
                        # is 3.8e-6, so this is ~25 ulp                      [9.5e-6]
MERGE_LOSS_RTOL = 1e-4  # relative difference of merged and unmerged MSE    [7.5e-6]


def _load():
    spec = importlib.util.spec_from_file_location("lorakit_examples_minimal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def minimal():
    return _load()


@pytest.fixture(scope="module")
def result(minimal):
    lines: list[str] = []
    out = minimal.run(epochs=EPOCHS, n=N, d_in=D_IN, d_out=D_OUT, seed=SEED, threads=1,
                      log=lines.append)
    out["log"] = lines
    return out


def _first_last(history):
    evals = history["eval"]
    return evals[0], evals[max(evals)]


def test_pretraining_learns_theta(result):
    first, last = _first_last(result["pretrain"])
    assert max(result["pretrain"]["eval"]) == EPOCHS
    # Initial loss ≈ d_in (E[(x·θ)²] for unit-variance x and θ)               [31.6 .. 36.2]
    assert 0.5 * D_IN < first < 2 * D_IN
    assert last < first * PRETRAIN_DROP, (first, last)


def test_lora_learns_the_rank_one_change(result):
    first, last = _first_last(result["lora"])
    # Before LoRA training B = 0, so the model is the pre-trained one and misses X·1: loss ≈ d_in.
    assert 0.5 * D_IN < first < 2 * D_IN
    assert last < first * LORA_DROP, (first, last)
    # The adapter found the change itself: ΔW = B·A ≈ the all-ones matrix.
    w = result["weights"]
    delta = w["final"] - w["pretrained"]
    assert (delta - 1).abs().max().item() < DELTA_TOL


def test_parameter_counts(result):
    p = result["params"]
    assert p["full"] == D_IN * D_OUT
    assert p["lora_trainable"] == 1 * (D_IN + D_OUT)  # r · (d_in + d_out), r = 1
    assert p["lora_total"] == D_IN * D_OUT + D_IN + D_OUT
    assert tuple(result["weights"]["lora_A"].shape) == (1, D_IN)
    assert tuple(result["weights"]["lora_B"].shape) == (D_OUT, 1)


def test_lora_training_leaves_base_weight_bit_exact(result):
    w = result["weights"]
    assert torch.equal(w["base_after_lora"], w["pretrained"])
    # ... while the adapter itself did train (B starts at zero).
    assert w["lora_B"].abs().min().item() > 0.1


def test_merged_model_matches_lora_model(result):
    # fp32: merged (x·(W + B·A)ᵀ) and unmerged (x·Wᵀ + (x·Aᵀ)·Bᵀ) outputs differ only by rounding.
    assert result["max_abs_diff_merged"] < MERGE_OUT_TOL
    assert math.isclose(result["loss_merged"], result["loss_unmerged"], rel_tol=MERGE_LOSS_RTOL)
    assert math.isclose(result["loss_unloaded"], result["loss_unmerged"], rel_tol=MERGE_LOSS_RTOL)
    assert result["unmerge_exact"]
    # merge_and_unload handed back the user's plain layer, with W + s·B·A folded in (s = alpha/r = 1).
    w = result["weights"]
    assert type(result["model"].linear) is torch.nn.Linear
    expected = w["pretrained"] + w["lora_B"] @ w["lora_A"]
    torch.testing.assert_close(w["final"], expected, rtol=0, atol=1e-5)


def test_log_prints_the_tables(result):
    text = "\n".join(result["log"])
    assert text.count("MSE (whole data)") == 2
    assert f"{D_IN + D_OUT:,} trainable" in text


def test_deterministic(minimal):
    kw = dict(epochs=2, n=300, d_in=9, d_out=8, seed=3, threads=1, log=lambda s: None)
    a, b = minimal.run(**kw), minimal.run(**kw)
    assert a["pretrain"]["eval"] == b["pretrain"]["eval"]
    assert a["lora"]["eval"] == b["lora"]["eval"]
    assert torch.equal(a["weights"]["final"], b["weights"]["final"])
    c = minimal.run(**{**kw, "seed": 4})
    assert c["pretrain"]["eval"] != a["pretrain"]["eval"]
