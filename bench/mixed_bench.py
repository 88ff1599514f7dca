"""Mixed-adapter batches: lorakit.mixed vs PEFT's ``adapter_names=`` vs one merged model.

    python bench/mixed_bench.py                 # all three comparisons (~15 min on 2 cores)
    python bench/mixed_bench.py --quick         # fewer rounds/adapters: a smoke run

Decode: SmolLM2-135M, B rows x 1 new token on a KV cache of 128 tokens (one untimed prefill; each
timed call gets a copy of the cache made before the clock starts), N distinct all-linear r=8
adapters. Prefill: MiniLM, 32 x 128 tokens, 16 all-linear r=8 adapters. Single: a batch whose
rows all use one adapter, lorakit.mixed vs the plain single-adapter path. The same adapter
weights serve both libraries (PEFT saves them, lorakit loads them), and the outputs are
compared before timing. "lorakit (first step)" opens the routing inside the timed call, so it
includes planning the routing (and, on the plain PyTorch path, gathering the rows' factors), which
``generate`` does once per call. Each lorakit variant runs twice in the same interleaved rounds: with
the per-row kernel (``lorakit.batching.rowlora``, the default) and with the plain PyTorch path it replaced
("torch path": the bank and gathered bmm, ``rowlora.use(False)``).

Memory (``--memory``, or part of the full run): the tensor bytes a mixed step of B rows x 1 token
allocates beyond the same step without a routing (every allocation counted, transient ones too: an
upper bound on the extra peak), and the bytes the layers and the routing still hold after it (bank,
plans), for B = 16, 64, 256 with 4 and 64 adapters, on both paths.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build(kind: str, n: int, log):
    """A PEFT model with n random all-linear r=8 adapters, a lorakit twin, and a merged model."""
    import peft
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    import lorakit
    from lorakit.builtin import minilm_path, smollm2_path
    path = smollm2_path() if kind == "decode" else minilm_path()
    load = (lambda: AutoModelForCausalLM.from_pretrained(path).eval()) if kind == "decode" else \
        (lambda: AutoModel.from_pretrained(path).eval())
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    pm = peft.get_peft_model(load(), cfg, adapter_name="a0")
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    for i in range(1, n):
        torch.manual_seed(i)
        pm.add_adapter(f"a{i}", cfg)
    pm.eval()
    log(f"  PEFT: {n} adapters built in {time.perf_counter() - t0:.0f} s")
    ours = load()
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        t0 = time.perf_counter()
        for i in range(n):
            lorakit.load(ours, Path(d) / f"a{i}", adapter=f"a{i}")
        log(f"  lorakit: {n} adapters loaded in {time.perf_counter() - t0:.1f} s")
    return pm, ours, merged


def _lorakit_only(n: int):
    """SmolLM2 with n all-linear r=8 adapters injected by lorakit (for the memory table: no PEFT twin)."""
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.builtin import smollm2_path
    model = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
    for i in range(n):
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear"), adapter=f"a{i}")
    return model


def compare(kind: str, B: int, n: int, args, models, log) -> dict:
    import torch

    import lorakit
    pm, ours, merged = models
    names = [f"a{i % n}" for i in range(B)]
    g = torch.Generator().manual_seed(1)
    if kind == "decode":
        prompt = torch.randint(100, 20000, (B, args.ctx), generator=g)
        with torch.inference_mode():
            pre = merged(input_ids=prompt, use_cache=True)
        cache0, tok = pre.past_key_values, pre.logits[:, -1].argmax(-1, keepdim=True)
        inputs = lambda: {"input_ids": tok, "past_key_values": copy.deepcopy(cache0), "use_cache": True}  # noqa
        logits = lambda o: o.logits  # noqa: E731
    else:
        ids = torch.randint(1000, 20000, (B, args.seq), generator=g)
        inputs = lambda: {"input_ids": ids}  # noqa: E731
        logits = lambda o: o.last_hidden_state  # noqa: E731
    from lorakit import routing as routing_state
    from lorakit.batching import rowlora
    routings, err = {}, {}
    for path in (True, False):  # correctness: lorakit (both paths) vs PEFT on the same weights
        rowlora.use(path)
        with torch.inference_mode():
            with lorakit.mixed(ours, names):
                a = logits(ours(**inputs()))
                routings[path] = routing_state.ROUTING.get()  # kept, with its plans, for the steady state
            b = logits(pm(**inputs(), adapter_names=names))
        err[path] = (a - b).abs().max().item()
        log(f"  check: lorakit ({'kernel' if path else 'torch path'}) vs PEFT max |diff| = {err[path]:.2e} "
            f"(outputs up to {b.abs().max().item():.1f})")
    rowlora.use(True)

    def run(fn):
        def timed(kw):
            with torch.inference_mode():
                return fn(kw)
        return timed, inputs

    def steady(path):  # the routing of an open block, planned already (as during generate)
        def step(kw):
            token = routing_state.ROUTING.set(routings[path])
            try:
                return ours(**kw)
            finally:
                routing_state.ROUTING.reset(token)
        return run(step)

    def first(path):  # a new routing opened inside the timed call
        def step(kw):
            rowlora.use(path)
            try:
                with lorakit.mixed(ours, names):
                    return ours(**kw)
            finally:
                rowlora.use(True)
        return run(step)
    variants = {"merged": run(lambda kw: merged(**kw)), "lorakit": steady(True), "lorakit (first step)": first(True),
                "torch path": steady(False), "torch path (first step)": first(False),
                "PEFT": run(lambda kw: pm(**kw, adapter_names=names))}
    times = common.interleave(variants, args.rounds, args.warmup, log=log)
    return {"kind": kind, "B": B, "N": n, "max_abs_diff_vs_peft": err[True], "max_abs_diff_vs_peft_torch": err[False],
            "ratios": {v: common.ratio(times, v, "merged") for v in variants}, "times": times}


def memory(models, log) -> list[dict]:
    """Tensor bytes of a mixed step (B rows x 1 token) beyond the same step without a routing, and the
    bytes left held by banks and plans, per path (see the module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import lorakit
    from lorakit.batching import rowlora

    class Allocations(TorchDispatchMode):  # fresh storages returned by every op (outputs aliasing an input excluded)
        def __enter__(self):
            self.bytes = 0
            return super().__enter__()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.bytes += t.untyped_storage().nbytes()
            return out

    def held(layers, routing) -> int:
        total, seen = 0, set()
        for layer in layers:
            bank = layer.__dict__.get("_bank")
            leaves = [] if bank is None else tree_leaves(bank[2])
            for t in leaves + tree_leaves([p[0] for p in routing._plans.values()]) + \
                    tree_leaves([p[1] for p in routing._plans.values()]):
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) \
                        and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        return total

    from lorakit import routing as routing_state
    _, ours, _ = models
    layers = [layer for _, layer in lorakit.lora_layers(ours)]
    factors = sum(p.numel() * p.element_size() for layer in layers for p in
                  (*layer.lora_A.values(), *layer.lora_B.values()))
    rows = []
    for path in (True, False):
        rowlora.use(path)
        for n in (4, 64):
            for B in (16, 64, 256):
                ids = torch.randint(100, 20000, (B, 1), generator=torch.Generator().manual_seed(B))
                with torch.inference_mode():
                    with Allocations() as plain:
                        ours(input_ids=ids, use_cache=False)
                    with lorakit.mixed(ours, [f"a{i % n}" for i in range(B)]):
                        with Allocations() as step:
                            ours(input_ids=ids, use_cache=False)
                        kept = held(layers, routing_state.ROUTING.get())
                for layer in layers:  # the next configuration starts without a bank
                    layer.__dict__.pop("_bank", None)
                r_max = 8
                bound = sum(4 * B * r_max for _ in layers)  # O(B·r_max) per layer: one fp32 h per row
                rows.append({"path": "kernel" if path else "torch path", "N": n, "B": B,
                             "extra_step_bytes": step.bytes - plain.bytes, "held_bytes": kept,
                             "adapters_bytes": factors * n // len(layers[0].lora_A), "B_r_bytes": bound})
                log(f"  memory {rows[-1]}")
    rowlora.use(True)
    return rows


def single(args, models, log) -> dict:
    """One adapter for every row: lorakit.mixed vs set_active (the plain path)."""
    import torch

    import lorakit
    _, ours, _ = models
    B = 64
    prompt = torch.randint(100, 20000, (B, args.ctx), generator=torch.Generator().manual_seed(2))
    lorakit.set_active(ours, "a0")
    with torch.inference_mode():
        pre = ours(input_ids=prompt, use_cache=True)
    cache0, tok = pre.past_key_values, pre.logits[:, -1].argmax(-1, keepdim=True)
    prep = lambda: {"input_ids": tok, "past_key_values": copy.deepcopy(cache0), "use_cache": True}  # noqa

    def plain(kw):
        with torch.inference_mode():
            return ours(**kw)

    def routed(kw):
        with torch.inference_mode(), lorakit.mixed(ours, ["a0"] * B):
            return ours(**kw)
    # a ratio near 1 needs more rounds than the others to resolve (this case is cheap): 3x as many
    times = common.interleave({"plain single adapter": (plain, prep), "lorakit.mixed, one adapter": (routed, prep)},
                              3 * args.rounds, args.warmup, log=log)
    return {"ratio": common.ratio(times, "lorakit.mixed, one adapter", "plain single adapter"), "times": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ctx", type=int, default=128, help="KV cache length for decode")
    p.add_argument("--seq", type=int, default=128, help="prefill tokens per row")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, B=N=16 decode only + prefill")
    p.add_argument("--memory", action="store_true", help="only the memory table")
    args = p.parse_args()
    common.setup(args.threads)
    if args.quick and args.rounds == p.get_default("rounds"):
        args.rounds, args.warmup = 3, 1
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = {"machine": common.machine(), "decode": [], "prefill": None}
    n_max = 16 if args.quick else 64
    log(f"decode: building SmolLM2 with {n_max} adapters")
    models = build("decode", n_max, log) if not args.memory else (None, _lorakit_only(n_max), None)
    results["memory"] = memory(models, log) if not args.quick else []
    mem = ["| path | adapters | B | extra bytes of a mixed step (MB) | held after it (MB) | "
           "adapters' own factors (MB) | B·r_max floats per layer (MB) |", "|---|---|---|---|---|---|---|"]
    for m in results["memory"]:
        mem.append(f"| {m['path']} | {m['N']} | {m['B']} | {m['extra_step_bytes'] / 1e6:.1f} | "
                   f"{m['held_bytes'] / 1e6:.1f} | {m['adapters_bytes'] / 1e6:.0f} | {m['B_r_bytes'] / 1e6:.2f} |")
    if args.memory:
        log("\n".join(mem))
        common.write("mixed_bench_memory", results, "\n".join(mem) + "\n")
        return
    for B, n in ([(16, 16)] if args.quick else [(64, 64), (16, 16), (64, 4)]):
        log(f"decode B={B} N={n}")
        results["decode"].append(compare("decode", B, n, args, models, log))
    log("single-adapter batch (decode B=64)")
    results["single"] = single(args, models, log)
    del models
    log("prefill: building MiniLM with 16 adapters")
    results["prefill"] = compare("prefill", 32, 16, args, build("prefill", 16, log), log)
    rows = ["| step | merged ms | lorakit, steady state | lorakit, first step of a new routing | torch path, steady "
            "| torch path, first step | PEFT | lorakit vs PEFT |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results["decode"] + [results["prefill"]]:
        q = r["ratios"]
        label = (f"decode B={r['B']}, {r['N']} adapters" if r["kind"] == "decode"
                 else f"prefill {r['B']}x{args.seq}, {r['N']} adapters")
        speed = q["PEFT"]["median"] / q["lorakit"]["median"]
        rows.append(f"| {label} | {q['merged']['ms']:.0f} | {1 / q['lorakit']['median']:.2f}x | "
                    f"{1 / q['lorakit (first step)']['median']:.2f}x | {1 / q['torch path']['median']:.2f}x | "
                    f"{1 / q['torch path (first step)']['median']:.2f}x | {1 / q['PEFT']['median']:.2f}x | {speed:.1f}x |")
    s = results["single"]["ratio"]
    md = ("Throughput as a fraction of one merged model (median of per-round ratios; higher is better), "
          f"{args.threads} threads, {args.rounds} rounds. Steady state: the routing stays open (every decode "
          "step of one generate call after the first); first step: the routing is opened inside the timed "
          "call, so the step plans it (the torch path also gathers every row's factors there: the first step of "
          "each generate call, and of each new batch composition in lorakit serve). lorakit: the per-row kernel "
          "(lorakit.batching.rowlora, the default); torch path: the bank + gathered bmm path it replaced, same "
          "rounds.\n\n" + "\n".join(rows) +
          f"\n\nOne adapter for all 64 rows: lorakit.mixed / plain single-adapter time = {common.fmt(s)} "
          f"(median [p25-p75] / ratio of minima; {3 * args.rounds} rounds).\n\n"
          f"Measured under load (load average {results['machine']['loadavg'][0]:.1f} on "
          f"{os.cpu_count()} cores at the start).\n\n" + "\n".join(mem) + "\n")
    log(md)
    common.write("mixed_bench" + ("_quick" if args.quick else ""), results, md)


if __name__ == "__main__":
    main()
