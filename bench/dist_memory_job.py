"""One rank of ``dist_bench.py --memory``: SmolLM2-135M, LoRA r=8 all-linear, a few training steps under
torchrun as DDP (whole model per rank), FSDP2 with sharded adapters, or FSDP2 with replicated adapters.

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/dist_memory_job.py ddp|sharded|replicated OUT.json

Every rank loads the whole model (as ``lorakit train`` does) and then shards it, so the peak RSS of the whole
process is the load's; the training peak is measured on its own: the kernel's peak RSS (VmHWM) is reset
(``/proc/self/clear_refs``) after sharding and read after the steps. Also the bytes of parameters each rank
holds (its shards, or everything). Rank 0 writes every rank's figures to OUT.json.
"""

import gc
import json
import sys
from pathlib import Path

import torch

from lorakit import LoraConfig, inject
from lorakit import distributed as D
from lorakit.train.data import collate, encode_causal
from lorakit.train.loop import TrainConfig, fit
from lorakit.train.tasks import bbc_headline_task, load_model


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main(mode: str, out: str, steps: int = 3, batch: int = 8) -> None:
    D.setup(torch.device("cpu"), 600)
    torch.manual_seed(0)
    model, tok = load_model("builtin:smollm2", "causal-lm")
    inject(model, LoraConfig(r=8, alpha=16, targets="all-linear"))
    if mode != "ddp":
        D.fully_shard_model(model, adapters=mode)
    gc.collect()
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    held = sum(local(p).numel() * p.element_size() for p in model.parameters())
    trainable = sum(local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rss_before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    rows = bbc_headline_task()["train"][:batch * steps]
    enc = encode_causal(tok, rows, 96)
    fit(model, enc, collate=lambda items: collate(items, tok.pad_token_id), loss_fn=lambda m, b: m(**b).loss,
        cfg=TrainConfig(epochs=1, batch_size=batch, lr=1e-3, max_steps=steps, log_every=1), progress=False)
    mine = torch.tensor([held / 2**20, trainable / 2**20, rss_before, status_mb("VmHWM")], dtype=torch.float64)
    every = [t.tolist() for t in D.gather(mine)]
    if D.is_main():
        keys = ("params_mb", "trainable_mb", "rss_after_setup_mb", "train_peak_rss_mb")
        Path(out).write_text(json.dumps({"mode": mode, "steps": steps, "batch": batch,
                                         "ranks": [dict(zip(keys, r)) for r in every]}, indent=2))
    D.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
