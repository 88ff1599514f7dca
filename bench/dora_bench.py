"""DoRA training cost: lorakit vs PEFT 0.21 (and lorakit's plain LoRA for scale), MiniLM.

    python bench/dora_bench.py                 # 8 rounds, 1 thread (~3 min)
    python bench/dora_bench.py --rounds 2      # smoke run

all-MiniLM-L6-v2 + 5-label head (AutoModelForSequenceClassification, head in modules_to_save), batch
16 x 128 random ids/labels, r=8 alpha=16 dropout 0 on query,value, fp32, AdamW lr 1e-4, train mode (BERT's
own dropout on). Step = forward + backward + AdamW.step + zero_grad; the variants live in one process
and are interleaved per round in a shuffled order (bench/common.interleave), ratios are medians of
per-round ratios vs PEFT DoRA. Memory: the bytes autograd keeps for backward in one training forward
(unique storages seen by a saved-tensors hook, parameters excluded) — deterministic, unlike RSS in a
shared process. Sanity: the three models start from the same weights, and at step 0 (B = 0, m = ‖W‖)
their eval-mode losses agree to 1e-5.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of ``model``."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    common.setup(args.threads)
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit import builtin

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(builtin.minilm_path(), num_labels=5)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 128), generator=g),
             "attention_mask": torch.ones(16, 128, dtype=torch.long),
             "labels": torch.randint(0, 5, (16,), generator=g)}
    qv = ["query", "value"]
    models = {
        "lorakit DoRA": lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(
            r=8, alpha=16, targets=qv, use_dora=True, modules_to_save=["classifier"])),
        "PEFT DoRA": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=qv, use_dora=True, modules_to_save=["classifier"])),
        "lorakit LoRA": lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(
            r=8, alpha=16, targets=qv, modules_to_save=["classifier"])),
    }
    losses = {}
    for name, m in models.items():
        m.eval()
        with torch.no_grad():
            losses[name] = m(**batch).loss.item()
    spread = max(losses.values()) - min(losses.values())
    assert spread < 1e-5, losses
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    assert trainable["lorakit DoRA"] == trainable["PEFT DoRA"], trainable
    mem = {}
    for name, m in models.items():
        m.train()
        mem[name] = saved_bytes(m, batch)
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def step(name):
        def run(_):
            loss = models[name](**batch).loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
        return run, None

    times = common.interleave({n: step(n) for n in models}, rounds=args.rounds, warmup=1)
    rows = {n: {"step_ratio_vs_peft": common.ratio(times, n, "PEFT DoRA"), "saved_mb": mem[n] / 2**20,
                "trainable": trainable[n]} for n in models}
    lines = ["| variant | s/step (median) | step time vs PEFT DoRA: median [p25-p75] / ratio of minima | "
             "saved for backward (MB) | trainable params |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['step_ratio_vs_peft']['ms'] / 1e3:.2f} | {common.fmt(r['step_ratio_vs_peft'])} | "
                     f"{r['saved_mb']:.1f} | {r['trainable']:,} |")
    md = (f"MiniLM seq-cls 16x128, q,v r=8, fp32, {args.threads} thread(s), {args.rounds} rounds, "
          f"measured under load (loadavg {common.machine()['loadavg']}); step-0 eval losses agree to {spread:.1e}\n\n"
          + "\n".join(lines) + "\n")
    print(md)
    common.write("dora_bench", {"machine": common.machine(), "rows": rows, "losses": losses,
                                "times": {k: v for k, v in times.items() if ":" not in k}}, md)


if __name__ == "__main__":
    main()
