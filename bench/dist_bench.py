"""Data-parallel training on one machine: 1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo),
and the bytes each step all-reduces with LoRA vs full fine-tuning.

    PYTHONPATH=src python bench/dist_bench.py [--steps 8] [--rounds 2] [--smollm2]
    PYTHONPATH=src python bench/dist_bench.py --memory     # DDP vs FSDP2 (adapters sharded / replicated)

``--memory``: per rank, on SmolLM2-135M (2 processes, 3 steps of a global batch of 8, bench/dist_memory_job.py):
the parameter bytes each rank holds and the peak RSS while training; writes bench/results/dist_memory.{json,md}.

Throughput is ``lorakit train``'s own examples/s over the training steps (the last ``train`` record of
metrics.jsonl: examples of the whole job / seconds since the loop started), same command and global
batch, variants interleaved per round. The bytes are arithmetic from the parameter counts of the
injected models: the all-reduce payload is every trainable parameter's gradient once (fp32); a ring
all-reduce sends and receives 2(N-1)/N times the payload per rank. Writes bench/results/dist_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = {"minilm": ["--task", "classify"],
         "smollm2": ["--task", "causal-lm", "--eval-limit", "16", "--train-limit", "64", "--batch-size", "8"]}


def run(task: str, variant: str, steps: int, out: Path) -> float:
    threads, nproc = (2, 1) if variant == "1x2" else (1, 2)
    cmd = [sys.executable, "-m", "lorakit.cli", "train", *TASKS[task], "--max-steps", str(steps), "--no-progress",
           "--threads", str(threads), "--nproc", str(nproc), "--out", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in train if r["split"] == "train"][-1]["examples_per_s"]


def payloads() -> list[dict]:
    """Trainable parameters (= gradient elements all-reduced per step) of the two ``lorakit train`` defaults."""
    import torch

    from lorakit import LoraConfig, inject
    from lorakit.train.tasks import load_model
    rows = []
    for task, spec, targets, saved in (("classify", "builtin:minilm", ["query", "value"], ("classifier",)),
                                       ("causal-lm", "builtin:smollm2", "all-linear", ())):
        model, _ = load_model(spec, task, num_labels=5)
        total = sum(p.numel() for p in model.parameters())
        inject(model, LoraConfig(r=8, alpha=16, targets=targets, modules_to_save=saved))
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"model": spec, "targets": targets if isinstance(targets, str) else ",".join(targets),
                     "lora_params": lora, "full_params": total, "lora_bytes": 4 * lora, "full_bytes": 4 * total})
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def memory() -> None:
    """DDP vs FSDP2 with sharded or replicated adapters: per-rank parameter bytes and training peak RSS."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "sharded", "replicated"):
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   str(ROOT / "bench" / "dist_memory_job.py"), mode, str(out)]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            rows.append(json.loads(out.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dist_memory.json").write_text(json.dumps(rows, indent=2))
    names = {"ddp": "DDP (whole model per rank)", "sharded": "FSDP2, adapters sharded",
             "replicated": "FSDP2, adapters replicated"}
    lines = [f"# dist_bench --memory ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): SmolLM2-135M, LoRA r=8 "
             "all-linear, 2 processes, 3 steps of a global batch of 8", "",
             "| layout | parameters held per rank | of which trainable | RSS after setup (rank 0, 1) | "
             "peak RSS while training (rank 0, 1) |", "|---|---|---|---|---|"]
    for r in rows:
        rk = r["ranks"]
        lines.append(f"| {names[r['mode']]} | {rk[0]['params_mb']:.1f} MiB | {rk[0]['trainable_mb']:.2f} MiB | "
                     f"{rk[0]['rss_after_setup_mb']:.0f}, {rk[1]['rss_after_setup_mb']:.0f} MiB | "
                     f"{rk[0]['train_peak_rss_mb']:.0f}, {rk[1]['train_peak_rss_mb']:.0f} MiB |")
    (out / "dist_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M causal-lm (slow)")
    ap.add_argument("--memory", action="store_true", help="only the DDP vs FSDP2 memory comparison")
    args = ap.parse_args()
    if args.memory:
        return memory()
    tasks = ["minilm"] + (["smollm2"] if args.smollm2 else [])
    speeds: dict = {t: {"1x2": [], "2x1": []} for t in tasks}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for task in tasks:
                order = ["1x2", "2x1"] if r % 2 == 0 else ["2x1", "1x2"]
                for variant in order:
                    t0 = time.perf_counter()
                    speeds[task][variant].append(run(task, variant, args.steps, Path(tmp) / f"{task}-{variant}"))
                    print(f"round {r} {task} {variant}: {speeds[task][variant][-1]:.2f} examples/s "
                          f"({time.perf_counter() - t0:.0f} s with loading and evaluation)", flush=True)
    sizes = payloads()
    result = {"steps": args.steps, "rounds": args.rounds, "load_average": os.getloadavg(), "speeds": speeds,
              "payloads": sizes, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dist_bench.json").write_text(json.dumps(result, indent=2))
    lines = [f"# dist_bench ({result['date']}; shared machine, load average {result['load_average'][0]:.1f} on "
             f"{os.cpu_count()} cores: noisy)", "",
             "| task | 1 process x 2 threads (ex/s) | 2 processes x 1 thread (ex/s) | ratio 2x1 / 1x2 |", "|---|---|---|---|"]
    for task in tasks:
        a, b = statistics.median(speeds[task]["1x2"]), statistics.median(speeds[task]["2x1"])
        lines.append(f"| {task} | {a:.2f} ({', '.join(f'{x:.2f}' for x in speeds[task]['1x2'])}) | {b:.2f} "
                     f"({', '.join(f'{x:.2f}' for x in speeds[task]['2x1'])}) | {b / a:.2f} |")
    lines += ["", "| model | LoRA params | all-reduced per step (fp32) | full fine-tuning | ratio |", "|---|---|---|---|---|"]
    for s in sizes:
        lines.append(f"| {s['model']} ({s['targets']}) | {s['lora_params']:,} | {s['lora_bytes'] / 2**20:.2f} MiB | "
                     f"{s['full_bytes'] / 2**20:.1f} MiB | {s['full_bytes'] / s['lora_bytes']:.0f}x |")
    (out / "dist_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
