"""Mixed-adapter batches: lorakit.mixed vs PEFT's ``adapter_names=`` vs one merged model.

    python bench/mixed_bench.py                 # all three comparisons (~15 min on 2 cores)
    python bench/mixed_bench.py --quick         # fewer rounds/adapters: a smoke run

Decode: SmolLM2-135M, B rows x 1 new token on a KV cache of 128 tokens (one untimed prefill; each
timed call gets a copy of the cache made before the clock starts), N distinct all-linear r=8
adapters. Prefill: MiniLM, 32 x 128 tokens, 16 all-linear r=8 adapters. Single: a batch whose
rows all use one adapter, lorakit.mixed vs the plain single-adapter path. The same adapter
weights serve both libraries (PEFT saves them, lorakit loads them), and the outputs are
compared before timing. "lorakit (first step)" opens the routing inside the timed call, so it
includes gathering the rows' factors, which ``generate`` does once per call.
"""

from __future__ import annotations

import argparse
import copy
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

    import lorakit
    from lorakit.builtin import minilm_path, smollm2_path
    from transformers import AutoModel, AutoModelForCausalLM
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
    routing = lorakit.mixed(ours, names)
    with torch.inference_mode():  # correctness: lorakit vs PEFT on the same weights
        with lorakit.mixed(ours, names):
            a = logits(ours(**inputs()))
        b = logits(pm(**inputs(), adapter_names=names))
    err = (a - b).abs().max().item()
    log(f"  check: lorakit vs PEFT max |diff| = {err:.2e} (outputs up to {b.abs().max().item():.1f})")
    routing.__enter__()  # steady state: the routing stays open, as during generate

    def run(fn):
        def timed(kw):
            with torch.inference_mode():
                return fn(kw)
        return timed, inputs

    def first(kw):
        with lorakit.mixed(ours, names):
            return ours(**kw)
    variants = {"merged": run(lambda kw: merged(**kw)), "lorakit": run(lambda kw: ours(**kw)),
                "lorakit (first step)": run(first),
                "PEFT": run(lambda kw: pm(**kw, adapter_names=names))}
    times = common.interleave(variants, args.rounds, args.warmup, log=log)
    routing.__exit__(None, None, None)
    return {"kind": kind, "B": B, "N": n, "max_abs_diff_vs_peft": err,
            "ratios": {v: common.ratio(times, v, "merged") for v in variants}, "times": times}


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
    args = p.parse_args()
    common.setup(args.threads)
    if args.quick and args.rounds == p.get_default("rounds"):
        args.rounds, args.warmup = 3, 1
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = {"machine": common.machine(), "decode": [], "prefill": None}
    n_max = 16 if args.quick else 64
    log(f"decode: building SmolLM2 with {n_max} adapters")
    models = build("decode", n_max, log)
    for B, n in ([(16, 16)] if args.quick else [(64, 64), (16, 16), (64, 4)]):
        log(f"decode B={B} N={n}")
        results["decode"].append(compare("decode", B, n, args, models, log))
    log("single-adapter batch (decode B=64)")
    results["single"] = single(args, models, log)
    del models
    log("prefill: building MiniLM with 16 adapters")
    results["prefill"] = compare("prefill", 32, 16, args, build("prefill", 16, log), log)
    rows = ["| step | merged ms | lorakit, steady state | lorakit, first step of a new routing | PEFT "
            "| lorakit vs PEFT |",
            "|---|---|---|---|---|---|"]
    for r in results["decode"] + [results["prefill"]]:
        q = r["ratios"]
        label = (f"decode B={r['B']}, {r['N']} adapters" if r["kind"] == "decode"
                 else f"prefill {r['B']}x{args.seq}, {r['N']} adapters")
        speed = q["PEFT"]["median"] / q["lorakit"]["median"]
        rows.append(f"| {label} | {q['merged']['ms']:.0f} | {1 / q['lorakit']['median']:.2f}x | "
                    f"{1 / q['lorakit (first step)']['median']:.2f}x | {1 / q['PEFT']['median']:.2f}x | {speed:.1f}x |")
    s = results["single"]["ratio"]
    md = ("Throughput as a fraction of one merged model (median of per-round ratios; higher is better), "
          f"{args.threads} threads, {args.rounds} rounds. Steady state: the routing stays open (every decode "
          "step of one generate call after the first); first step: the routing is opened inside the timed "
          "call, so the step gathers every row's factors (the first step of each generate call, and of "
          "each new batch composition in lorakit serve).\n\n" + "\n".join(rows) +
          f"\n\nOne adapter for all 64 rows: lorakit.mixed / plain single-adapter time = {common.fmt(s)} "
          f"(median [p25-p75] / ratio of minima; {3 * args.rounds} rounds).\n")
    log(md)
    common.write("mixed_bench" + ("_quick" if args.quick else ""), results, md)


if __name__ == "__main__":
    main()
