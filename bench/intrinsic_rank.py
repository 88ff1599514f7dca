"""The seed's claim, measured: does full fine-tuning's update ΔW have a low intrinsic rank, and does a
trained LoRA find it? (MiniLM + BBC News, the task of ``lorakit train`` and bench/finetune_table.py.)

1. Full fine-tuning as in bench/finetune_table.py (fixed split 1777/227/221, 3 epochs, batch 16,
   lr 5e-5, max_length 128, one seed); the last step's weights W₁ are the "tuned" model.
2. For every weight that LoRA ``all-linear`` adapts (36 matrices in 6 layers + the pooler), the
   singular values of ΔW = W₁ − W₀ (float64) and the energy share Σ_{i≤r} σᵢ² / Σ σᵢ² at each r.
3. Adapters extracted at each r (:func:`lorakit.extract`, truncated SVD of ΔW, plus the trained
   classifier head copied whole), on all-linear and on (query, value); test accuracy of each.
4. LoRA trained directly at each r (lr 1e-3, α = 16, head trained) on all-linear and (query, value);
   test accuracy of the last step, and how much of its update lies in full fine-tuning's top-r
   left singular subspace: ‖U_rᵀ·ΔW_LoRA‖² / ‖ΔW_LoRA‖² (a random r-dim subspace gets r/d).

    python bench/intrinsic_rank.py --device cuda --seed 0 --results out/s0   # one seed (~160 s on an H200)
    python bench/intrinsic_rank.py --report out/s*/intrinsic_rank.json        # the table and figure over seeds
    python bench/intrinsic_rank.py --quick                                    # smoke run (a few steps)

A run writes ``intrinsic_rank.json`` (each finished part at once, so an interrupted run keeps what it
measured), ``.md`` and ``.png`` to ``--results``. The README's table: seeds 0, 1, 2 on an H200
(``bench/results/intrinsic_rank_s{0,1,2}.json``, spectra rounded to 5 digits), then ``--report``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import lorakit  # noqa: E402
from lorakit.ops.extraction import energy_at, extract  # noqa: E402
from lorakit.targets import plan  # noqa: E402
from lorakit.train.data import encode_classification  # noqa: E402
from lorakit.train.loop import TrainConfig, load_checkpoint_weights  # noqa: E402
from lorakit.train.tasks import LoraSpec, _classification_data, _prepare, classify, evaluate_classifier, load_model  # noqa: E402

TARGETS = {"all-linear": ("all-linear",), "query,value": ("query", "value")}


def test_accuracy(model, enc, pad_id, device) -> float:
    model.to(device).eval()
    with torch.no_grad():
        acc = evaluate_classifier(model, enc, pad_id)["accuracy"]
    model.to("cpu")
    return acc


def last_step(out: Path, lora: LoraSpec, labels) -> torch.nn.Module:
    """The model of a run's last optimizer step (its checkpoint), on the CPU."""
    model, _ = load_model("builtin:minilm", "classify", num_labels=len(labels))
    _prepare(model, lora, ["classifier"])
    load_checkpoint_weights(out / "checkpoint", model)
    return model


def spectra_of(base, tuned, sites) -> dict[str, torch.Tensor]:
    named = dict(tuned.named_modules())
    out = {}
    for s in sites:
        d = named[s.path].weight.detach().double() - s.weight.detach().double()
        out[s.path] = torch.linalg.svdvals(d)
    return out


def overlap(model, tuned_svd: dict, r: int) -> float:
    """Mean over matrices of ‖U_rᵀ ΔW_LoRA‖² / ‖ΔW_LoRA‖²."""
    shares = []
    for path, layer in lorakit.lora_layers(model):
        if path not in tuned_svd:
            continue
        d = layer.delta("default", compute=torch.float64).detach().cpu()
        u = tuned_svd[path][:, :r]
        total = float((d ** 2).sum())
        if total > 0:
            shares.append(float(((u.t() @ d) ** 2).sum()) / total)
    return statistics.mean(shares)


def _kind(path: str) -> str:
    """The weight's role, for the figure's colours: query, key, value, attn.out, intermediate, output, pooler."""
    short = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attn.out", "intermediate.dense": "intermediate", "output.dense": "output"}
    rest = path.split("encoder.layer.", 1)[-1].split(".", 1)[-1] if "encoder.layer." in path else path
    return short.get(rest, rest.replace("bert.", "").replace(".dense", ""))


def report(raws: list[dict], results: Path) -> str:
    """Write intrinsic_rank.md and intrinsic_rank.png from one run per seed; returns the table.
    Accuracies: mean ± sample std over seeds; energy: median (min-max) over every matrix of every seed;
    the figure: the first seed's spectra."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks = raws[0]["args"]["ranks"]
    spectra = {p: torch.tensor(s, dtype=torch.float64) for p, s in raws[0]["spectra"].items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {}
    for path, sv in spectra.items():
        kind = _kind(path)
        new = kind not in colors
        color = colors.setdefault(kind, f"C{len(colors)}")
        left.semilogy(range(1, sv.numel() + 1), (sv / sv[0]).numpy(), color=color, lw=0.7, alpha=0.75,
                      label=kind if new else None)
        e = torch.cumsum(sv ** 2, 0) / (sv ** 2).sum()
        right.plot(range(1, sv.numel() + 1), e.numpy(), color=color, lw=0.7, alpha=0.75)
    for r in ranks:
        right.axvline(r, color="grey", lw=0.5, ls=":")
    left.set(xlabel="i", ylabel="σ_i / σ_1 of ΔW = W_tuned − W_base", title="singular values, one line per weight")
    right.set(xscale="log", xlabel="rank r", ylabel="energy Σ_{i≤r} σ_i² / Σ σ_i²",
              title="energy captured at rank r (dotted: " + ", ".join(map(str, ranks)) + ")")
    left.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Full fine-tuning of MiniLM on BBC News (seed {raws[0]['args']['seed']}): spectra of ΔW for the "
                 f"{len(spectra)} weights all-linear LoRA adapts", fontsize=10)
    fig.tight_layout()
    fig.savefig(results / "intrinsic_rank.png", dpi=110)
    plt.close(fig)

    def ms(values) -> str:
        values = [100 * v for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {sd:.1f}"

    def energy(qv_only: bool, r: int) -> str:
        vals = [e[str(r)] if str(r) in e else e[r] for raw in raws for p, e in raw["energy"].items()
                if not qv_only or p.endswith(("query", "value"))]
        return f"{100 * statistics.median(vals):.1f} ({100 * min(vals):.1f}-{100 * max(vals):.1f})"

    def acc(part: str, key: str) -> str:
        found = [raw[part][key]["test_accuracy"] for raw in raws if key in raw.get(part, {})]
        return ms(found) if len(found) == len(raws) else "—"

    seeds = " ".join(str(raw["args"]["seed"]) for raw in raws)
    lines = [f"MiniLM-L6-v2 + BBC News (the split of bench/finetune_table.py; test 221 articles), seeds {seeds}, "
             f"{raws[0]['args']['epochs']:g} epochs, batch 16, max_length 128, fp32, on {raws[0].get('gpu') or raws[0]['device']}. "
             "Accuracy: mean ± std over seeds, last step; energy: median (min-max) over every matrix of every seed.", "",
             f"Full fine-tuning (lr 5e-5): **{ms([r['full']['test_accuracy'] for r in raws])} %** "
             f"(best-validation checkpoint: {ms([r['full']['test_accuracy_best_val'] for r in raws])} %). "
             f"Ceiling of an adapter on these targets (all of ΔW on the targeted weights + the trained head, "
             f"nothing else): all-linear {ms([r['ceiling']['all-linear'] for r in raws])} %, (query, value) "
             f"{ms([r['ceiling']['query,value'] for r in raws])} %.", "",
             "| r | energy kept, all-linear (%) | energy kept, q,v (%) | extracted, all-linear | extracted, q,v "
             "| LoRA trained, all-linear | LoRA trained, q,v | LoRA's ΔW in FT's top-r subspace, all-linear (random) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ranks:
        key = lambda t: f"{t} r={r}"  # noqa: E731
        ov = [raw["lora"][key("all-linear")] for raw in raws if key("all-linear") in raw.get("lora", {})]
        ov_s = f"{ms([o['overlap'] for o in ov])} % ({100 * ov[0]['overlap_random']:.1f} %)" if ov else "—"
        lines.append(f"| {r} | {energy(False, r)} | {energy(True, r)} | {acc('extracted', key('all-linear'))} | "
                     f"{acc('extracted', key('query,value'))} | {acc('lora', key('all-linear'))} | "
                     f"{acc('lora', key('query,value'))} | {ov_s} |")
    table = "\n".join(lines) + "\n"
    (results / "intrinsic_rank.md").write_text(table)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                   help="target sets for the LoRA trained directly (each costs one training per rank)")
    p.add_argument("--max-steps", type=int, default=0, help="cut every training short (smoke runs)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps per training, ranks 1 and 8")
    p.add_argument("--work", default="runs/intrinsic_rank")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="only make the table and figure from these runs' JSON files (one per seed)")
    args = p.parse_args()
    if args.report:
        print(report([json.loads(Path(f).read_text()) for f in args.report], Path(args.results)))
        return
    if args.quick:
        args.max_steps, args.ranks = 3, [1, 8]
    torch.manual_seed(args.seed)
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    raw: dict = {"args": {k: v for k, v in vars(args).items()}, "device": str(args.device),
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and "cuda" in args.device else None}
    t0 = time.perf_counter()

    def save():
        raw["seconds"] = time.perf_counter() - t0
        (results / "intrinsic_rank.json").write_text(json.dumps(raw, indent=1))

    def train(name, lora, lr):
        cfg = TrainConfig(epochs=args.epochs, batch_size=16, lr=lr, seed=args.seed, max_steps=args.max_steps)
        summary = classify(work / name, lora=lora, train=cfg, max_length=128, progress=False, overwrite=True,
                           device=args.device, log=lambda *a: None)
        return summary

    # 1. full fine-tuning
    full = train("full", LoraSpec(full=True), 5e-5)
    labels = full["labels"]
    tuned = last_step(work / "full", LoraSpec(full=True), labels)
    base, tok = load_model("builtin:minilm", "classify", num_labels=len(labels))
    test = _classification_data("builtin:bbc", None, None, "text", "label", args.seed)["test"]
    enc = encode_classification(tok, test, labels, 128)
    pad = tok.pad_token_id
    raw["full"] = {"test_accuracy_best_val": full["test_accuracy"], "test_accuracy": test_accuracy(tuned, enc, pad,
                   args.device), "seconds": full["train_seconds"], "steps": full["steps"]}
    print(f"full FT: {raw['full']}", flush=True)

    # 2. spectra of ΔW on every weight all-linear adapts
    sites = plan(base, lorakit.LoraConfig(targets="all-linear"))
    spectra = spectra_of(base, tuned, sites)
    raw["spectra"] = {p: s.tolist() for p, s in spectra.items()}
    raw["energy"] = {p: {r: energy_at(s, r) for r in args.ranks} for p, s in spectra.items()}
    named = dict(tuned.named_modules())
    svd_u = {s.path: torch.linalg.svd(named[s.path].weight.detach().double() - s.weight.detach().double(),
                                      full_matrices=False)[0] for s in sites}
    # what LoRA can at most reach with these targets: all of ΔW on them + the head, nothing else
    raw["ceiling"] = {}
    for tname, targets in TARGETS.items():
        m = copy.deepcopy(base)
        chosen = {s.path for s in plan(m, lorakit.LoraConfig(targets=list(targets) if tname != "all-linear"
                                                               else "all-linear"))}
        with torch.no_grad():
            for path, module in m.named_modules():
                if path in chosen:  # the weight LoRA adapts (not the bias)
                    module.weight.copy_(named[path].weight)
                elif path == "classifier":
                    module.load_state_dict(named[path].state_dict())
        raw["ceiling"][tname] = test_accuracy(m, enc, pad, args.device)
    save()

    # 3. extraction at each rank
    raw["extracted"] = {}
    for tname, targets in TARGETS.items():
        for r in args.ranks:
            m = copy.deepcopy(base)
            made = extract(m, tuned, rank=r, targets=targets[0] if tname == "all-linear" else list(targets),
                             modules_to_save=["classifier"])
            acc = test_accuracy(m, enc, pad, args.device)
            raw["extracted"][f"{tname} r={r}"] = {
                "test_accuracy": acc, "params": sum(t.numel() for t in m.parameters() if t.requires_grad),
                "energy_mean": statistics.mean(l.energy for l in made.layers.values()),
                "error_mean": statistics.mean(l.error for l in made.layers.values())}
            print(f"extracted {tname} r={r}: {raw['extracted'][f'{tname} r={r}']}", flush=True)
            save()

    # 4. LoRA trained directly at each rank
    raw["lora"] = {}
    for tname in args.lora_targets:
        for r in args.ranks:
            lora = LoraSpec(r=r, alpha=16, targets=TARGETS[tname])
            s = train(f"lora_{tname.replace(',', '_')}_r{r}", lora, 1e-3)
            m = last_step(work / f"lora_{tname.replace(',', '_')}_r{r}", lora, labels)
            raw["lora"][f"{tname} r={r}"] = {
                "test_accuracy": test_accuracy(m, enc, pad, args.device),
                "test_accuracy_best_val": s["test_accuracy"], "params": s["trainable_params"],
                "seconds": s["train_seconds"], "overlap": overlap(m, svd_u, r),
                "overlap_random": statistics.mean(r / svd_u[p].shape[0] for p, _ in lorakit.lora_layers(m)
                                                  if p in svd_u)}
            print(f"LoRA {tname} r={r}: {raw['lora'][f'{tname} r={r}']}", flush=True)
            save()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    try:
        print(report([raw], results))
    except ImportError as e:  # no matplotlib where it ran: --report makes them from the JSON
        print(f"no figure: {e}")


if __name__ == "__main__":
    main()
