"""A tiny training job for tests/test_distributed.py, run by torchrun (or directly as one process).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_job.py OUT '{"batch_size": 7}'

Trains LoRA on a small MLP with :func:`lorakit.train.fit`; rank 0 writes OUT/final.safetensors (the
trained parameters) and OUT/records.json, and lorakit.save's adapter to OUT/adapter. ``fail_rank``/``fail_step``
make that rank raise in its loss function at that optimizer step (a rank that dies mid-run), ``hang_rank``
sleep there instead (a rank that hangs; ``timeout_s`` is the collectives' timeout); ``fsdp`` shards
the model with FSDP2 (each LoRA layer one unit, then the root), saves it in place (lorakit.save on every
rank) and tries to merge it (OUT/merge_refused.json). After leaving the process group each rank writes the
names of its threads left (Linux) to OUT/threads.RANK.json."""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit import distributed as D
from lorakit.train import TrainConfig, fit


def problem(n: int = 100):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"], modules_to_save=["2"]))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, generator=g), int(i % 3)) for i in range(n)]
    return model, data


def collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}


def main(out: str, options: dict) -> None:
    fail_rank, fail_step = options.pop("fail_rank", None), options.pop("fail_step", None)
    hang_rank = options.pop("hang_rank", None)
    resume, fsdp = options.pop("resume", False), options.pop("fsdp", False)
    D.setup(torch.device("cpu"), timeout_s=options.pop("timeout_s", 60))
    model, data = problem()
    if fsdp:
        model._no_split_modules = ["LoraLayer"]
        D.fully_shard_model(model)
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if D.rank() == fail_rank and calls["n"] > fail_step:
            raise RuntimeError(f"injected failure on rank {D.rank()}")
        if D.rank() == hang_rank and calls["n"] > fail_step:
            time.sleep(600)  # a rank that hangs: the others' next collective times out
        return nn.functional.cross_entropy(m(b["x"]), b["y"])

    def evaluate(m):  # sharded: each rank its share, sums reduced
        mine = D.shard(data)
        b = collate(mine)
        loss, n = D.reduce_sums([nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="sum").item(), len(mine)])
        return {"loss": loss / n}

    cfg = TrainConfig(**{"epochs": 2, "lr": 1e-2, "log_every": 1, "save_every": 3, "eval_every": 5, **options})
    records = fit(model, data, collate=collate, loss_fn=loss_fn, cfg=cfg, evaluate=evaluate, out_dir=out,
                  resume=resume, progress=False)
    final = D.trainable_state(model)  # gathered from the shards under FSDP2
    if fsdp:
        lorakit.save(model, f"{out}/adapter")  # every rank: the shards are gathered, rank 0 writes
        refusals = _merge_refused(model, data)
    if D.is_main():
        save_file(final, f"{out}/final.safetensors")
        if not fsdp:
            lorakit.save(model, f"{out}/adapter")
        else:
            (Path(out) / "merge_refused.json").write_text(json.dumps(refusals))
        with open(f"{out}/records.json", "w") as f:
            json.dump(records, f)
    me = D.rank()
    D.teardown()  # the sharded model is still alive here: teardown must not need it gone
    if Path("/proc/self/task").is_dir():  # Linux: the names of this process's threads left after teardown
        names = sorted((t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir())
        (Path(out) / f"threads.{me}.json").write_text(json.dumps(names))


def _merge_refused(model, data) -> dict:
    """Try merge and merge_and_unload on the sharded model: each must raise LoraError and leave the outputs
    bit for bit as they were (the same forward before and after)."""
    x = collate(data[:5])["x"]
    with torch.no_grad():
        before = model(x)
    messages = {}
    for name, fn in (("merge", lorakit.merge), ("merge_and_unload", lorakit.merge_and_unload)):
        try:
            fn(model)
            messages[name] = None
        except lorakit.LoraError as e:
            messages[name] = str(e)
    with torch.no_grad():
        after = model(x)
    from torch.distributed.tensor import DTensor
    return {"messages": messages, "unchanged": bool(torch.equal(before, after)),
            "layers": len(list(lorakit.lora_layers(model))),
            # lorakit's registry holds the shards, not the unsharded originals (which would stay in memory)
            "registry_sharded": all(isinstance(p, DTensor) for p, _ in lorakit.registry(model).frozen)}


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
