"""bitsandbytes vs torchao NF4 as lorakit's quantized base: one LoRA training step (fwd + bwd,
grads for x, A, B) through a SmolLM2-sized MLP stack (576 -> 1536 -> 576, 8 blocks, 1024 tokens,
r=8), fp32 activations, 1 thread; rounds interleaved, medians; weight bytes as stored.

    pip install -c requirements/constraints.txt torchao==0.18.0   # not a lorakit dependency (see README)
    python bench/quant_backend.py         # writes bench/results/quant_backend.{md,json}
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

D, H, BLOCKS, TOKENS, R = 576, 1536, 8, 1024, 8


def _weights():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(H, D, generator=g) * 0.04, torch.randn(D, H, generator=g) * 0.03) for _ in range(BLOCKS)]


def _factors(shapes):
    return [(nn.Parameter(torch.randn(R, i) * 0.01), nn.Parameter(torch.zeros(o, R))) for o, i in shapes]


def build(kind: str):
    """(weights, forward(x, w, a, b)) for one backend; weights are frozen."""
    ws = _weights()
    if kind == "fp32":
        return [w for pair in ws for w in pair], lambda x, w: x @ w.t()
    if kind == "bnb":
        import bitsandbytes as bnb
        qs = []
        for pair in ws:
            for w in pair:
                p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
                qs.append(p)
        return qs, lambda x, p: bnb.matmul_4bit(x, p.t(), quant_state=p.quant_state)
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    return [to_nf4(w) for pair in ws for w in pair], linear_nf4


def nbytes(kind, weights) -> int:
    if kind == "fp32":
        return sum(w.numel() * 4 for w in weights)
    if kind == "bnb":
        return sum(p.numel() * p.element_size() + p.quant_state.absmax.numel() * 4 for p in weights)
    total = 0
    for t in weights:
        for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
            x = getattr(t, name, None)
            if isinstance(x, torch.Tensor):
                total += x.numel() * x.element_size()
    return total


def main() -> None:
    common.setup(1)
    import importlib.util
    kinds = ("fp32", "bnb", "torchao") if importlib.util.find_spec("torchao") else ("fp32", "bnb")
    variants = {k: build(k) for k in kinds}
    shapes = [(H, D), (D, H)] * BLOCKS
    factors = {k: _factors(shapes) for k in variants}
    x0 = torch.randn(TOKENS, D)

    def step(kind):
        weights, fwd = variants[kind]
        h = x0.clone().requires_grad_()
        out = h
        for (w, (a, b)) in zip(weights, factors[kind]):
            out = fwd(out, w) + (out @ a.t()) @ b.t() * 2.0
            if out.shape[-1] == H:
                out = torch.relu(out)
        out.sum().backward()

    times = {k: [] for k in variants}
    for k in variants:
        step(k)
    for _ in range(7):
        order = list(variants)
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = ["| backend | weights MB | step ms (median of 7) | / fp32 |", "|---|---|---|---|"]
    for k in variants:
        rows.append(f"| {k} | {nbytes(k, variants[k][0]) / 2**20:.1f} | {med[k] * 1e3:.0f} | {med[k] / med['fp32']:.2f} |")
    md = "\n".join(rows)
    print(md)
    common.write("quant_backend", {"times": times, "machine": common.machine()}, md)


if __name__ == "__main__":
    main()
