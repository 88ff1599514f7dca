"""GPU check of training on a device (run it when a CUDA machine is at hand; ~1 minute).

    PYTHONPATH=src python bench/gpu_check_train.py [--device cuda] [--cli]

1. A LoRA MLP trains a few steps with :func:`lorakit.train.fit` on the device (fp32, then bf16
   autocast): the adapters stay on the device, the loss falls, the checkpoint holds CPU tensors.
2. Resume: a run killed in step 5 and resumed (a fresh model on the device, ``resume=True``)
   ends with bit-identical adapters to an uninterrupted 8-step run (RNG states incl. CUDA's restored;
   dropout 0.3 so the CUDA RNG matters).
3. ``--cli``: ``lorakit train --device cuda --max-steps 3`` on MiniLM + BBC, then
   ``lorakit predict --device cuda`` with the adapter it wrote.
Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.train import TrainConfig, fit


def problem(device: torch.device, dropout: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["0", "2"], dropout=dropout))
    model.to(device)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, generator=g), i % 4) for i in range(256)]
    return model, data


def collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}


def loss_fn(m, b):
    return nn.functional.cross_entropy(m(b["x"]), b["y"])


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cli", action="store_true", help="also run lorakit train/predict on MiniLM + BBC")
    args = ap.parse_args()
    device = lorakit.distributed.resolve_device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}), "
          f"torch {torch.__version__}")
    failures = []

    def check(name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failures.append(name)

    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (False, True):
            model, data = problem(device, 0.0)
            before = loss_fn(model, {k: v.to(device) for k, v in collate(data).items()}).item()
            cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, bf16=bf16, log_every=100)
            fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, out_dir=f"{tmp}/a{bf16}", progress=False)
            after = loss_fn(model, {k: v.to(device) for k, v in collate(data).items()}).item()
            on_device = all(p.device == device for p in model.parameters())
            check(f"train bf16={bf16}", on_device and after < before, f"loss {before:.4f} -> {after:.4f}")
        from safetensors import safe_open
        with safe_open(f"{tmp}/aFalse/checkpoint/state.safetensors", "pt") as f:
            check("checkpoint written from the device", "rng.cuda" in f.keys() or device.type != "cuda",
                  f"keys {sorted(k for k in f.keys() if k.startswith('rng'))}")

        cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2, save_every=1, log_every=1)  # 8 steps
        model, data = problem(device, 0.3)
        fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, out_dir=f"{tmp}/full", progress=False)
        want = adapters(model)
        model, data = problem(device, 0.3)
        calls = []

        def dies_in_step_5(m, b):  # a run killed after its 4th checkpoint
            calls.append(1)
            if len(calls) > 4:
                raise KeyboardInterrupt
            return loss_fn(m, b)
        try:
            fit(model, data, collate=collate, loss_fn=dies_in_step_5, cfg=cfg, out_dir=f"{tmp}/cut", progress=False)
        except KeyboardInterrupt:
            pass
        model, data = problem(device, 0.3)
        fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, out_dir=f"{tmp}/cut", resume=True,
            progress=False)
        got = adapters(model)
        same = all(torch.equal(got[k], want[k]) for k in want)
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        check("resume = uninterrupted (bit for bit)", same, f"max |diff| {worst:.3g}")

        if args.cli:
            run = [sys.executable, "-m", "lorakit.cli"]
            out = Path(tmp) / "cls"
            p = subprocess.run([*run, "train", "--device", args.device, "--max-steps", "3", "--eval-every", "3",
                                "--out", str(out), "--no-progress"], capture_output=True, text=True)
            check("lorakit train --device", p.returncode == 0, p.stdout.strip().splitlines()[-1:] or p.stderr[-500:])
            p = subprocess.run([*run, "predict", "--device", args.device, "--adapter", str(out / "adapter"),
                                "Shares rose sharply after the bank's results."], capture_output=True, text=True)
            check("lorakit predict --device", p.returncode == 0, p.stdout.strip() or p.stderr[-500:])
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
