"""One LoRA linear layer, lorakit vs PEFT vs loralib, as ratios to a plain nn.Linear.

    python bench/layer_bench.py --threads 1      # the main table (~3 min)
    python bench/layer_bench.py --threads 2
    python bench/layer_bench.py --profile --ranks 8    # fwd+bwd per aten op: where the gap to the limit goes

d_in = d_out = 1024, 2048 tokens (8 x 256), r in {8, 64}, alpha 16, dropout 0, fp32.
fwd: inference only (torch.inference_mode). fwd+bwd: gradients for x, A and B (base frozen);
the baseline is a frozen nn.Linear with a gradient for x. All variants get the same weights and
are checked against the textbook formula first. Cells: median per-round ratio [p25-p75] / ratio
of minimum times; MF = minor page faults per call (2048 ≈ one fresh 8 MiB buffer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def variants(r: int, d: int, alpha: float):
    import loralib
    import peft
    import torch
    from torch import nn

    import lorakit
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    a, b = torch.randn(r, d) / d ** 0.5, torch.randn(d, r) / r ** 0.5

    def lorakit_layer():
        m = nn.Sequential(nn.Linear(d, d))
        m[0].load_state_dict(base.state_dict())
        lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=alpha, targets=["0"]))
        with torch.no_grad():
            m[0].lora_A["default"].copy_(a)
            m[0].lora_B["default"].copy_(b)
        return m[0]

    def peft_layer():
        m = nn.Sequential(nn.Linear(d, d))
        m[0].load_state_dict(base.state_dict())
        pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]))
        layer = pm.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        return layer

    def loralib_layer():
        m = loralib.Linear(d, d, r=r, lora_alpha=alpha, merge_weights=False)
        with torch.no_grad():
            m.weight.copy_(base.weight)
            m.bias.copy_(base.bias)
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
        loralib.mark_only_lora_as_trainable(m)
        return m

    plain = nn.Linear(d, d)
    plain.load_state_dict(base.state_dict())
    plain.requires_grad_(False)
    layers = {"nn.Linear": plain, "lorakit": lorakit_layer(), "PEFT": peft_layer(), "loralib": loralib_layer()}
    return layers, base, a, b


def check(layers, base, a, b, r, alpha, x):
    import torch
    s = alpha / r
    ref = (x.double() @ base.weight.double().t() + base.bias.double()
           + s * (x.double() @ a.double().t()) @ b.double().t())
    for name, layer in layers.items():
        if name == "nn.Linear":
            continue
        with torch.no_grad():
            err = (layer(x).double() - ref).abs().max().item()
        assert err < 1e-3, (name, err)


def run_mode(layers, x, mode, rounds, warmup, log):
    import torch
    g = torch.randn(x.shape[0], x.shape[1], layers["nn.Linear"].out_features)

    def fwd(layer):
        def run(_):
            with torch.inference_mode():
                return layer(x)
        return run, None

    def fwd_bwd(layer):
        def prepare():
            return x.detach().clone().requires_grad_()

        def run(xg):
            layer(xg).backward(g)
            for p in layer.parameters():
                p.grad = None
            return xg.grad
        return run, prepare

    make = fwd if mode == "fwd" else fwd_bwd
    times = common.interleave({n: make(layer) for n, layer in layers.items()}, rounds, warmup, log=log)
    return {n: {**common.ratio(times, n, "nn.Linear"),
                "faults": sorted(times[f"{n}:faults"])[len(times[n]) // 2]} for n in layers}


def profile(layers, x, names=("nn.Linear", "lorakit", "PEFT"), iters: int = 20) -> str:
    """fwd+bwd per aten op (torch.profiler, self CPU time per call, grouped by input shapes), in % of
    the frozen nn.Linear's fwd+bwd: which op the gap to the limit is made of."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    g = torch.randn(x.shape[0], x.shape[1], layers["nn.Linear"].out_features)
    tables, base_us = [], None
    for name in names:
        layer = layers[name]
        xg = x.detach().clone().requires_grad_()
        for _ in range(3):
            layer(xg).backward(g)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(iters):
                layer(xg).backward(g)
                for q in layer.parameters():
                    q.grad = None
                xg.grad = None
        events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) / iters
        base_us = base_us or total
        rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        tables.append(f"{name}: {total / 1e3:.2f} ms per fwd+bwd ({total / base_us:.3f} x nn.Linear)\n" + "\n".join(
            f"    {e.self_cpu_time_total / iters / 1e3:7.2f} ms {100 * e.self_cpu_time_total / iters / base_us:5.1f}%  "
            f"{e.key:22s} {str(e.input_shapes)[:70]}" for e in rows))
    return "\n".join(tables)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="5 rounds, a smoke run")
    p.add_argument("--profile", action="store_true", help="instead of timing: per-op profile of fwd+bwd (torch.profiler)")
    args = p.parse_args()
    common.setup(args.threads)
    if args.quick:
        args.rounds, args.warmup = 5, 1
    import torch
    log = lambda s: print(s, flush=True)  # noqa: E731
    results, lines = {"machine": common.machine(), "runs": []}, []
    x = torch.randn(8, args.tokens // 8, args.d)
    for r in args.ranks:
        layers, base, a, b = variants(r, args.d, 16.0)
        check(layers, base, a, b, r, 16.0, x)
        if args.profile:
            log(f"r={r}, {args.threads} thread(s): self CPU time per op, % of the frozen nn.Linear's fwd+bwd\n"
                + profile(layers, x))
            continue
        fwd_limit = 1 + r * 2 * args.d / args.d ** 2
        bwd_limit = 1 + 1.5 * r * 2 * args.d / args.d ** 2  # 6 small GEMMs over 2 big ones (fwd, dx)
        for mode, limit in (("fwd", fwd_limit), ("fwd+bwd", bwd_limit)):
            log(f"r={r} {mode}")
            res = run_mode(layers, x, mode, args.rounds, args.warmup, log)
            results["runs"].append({"r": r, "mode": mode, "limit": limit, "results": res})
            plain_ms = res["nn.Linear"]["ms"]
            cells = " | ".join(f"{common.fmt(res[n])} (MF {res[n]['faults']})" for n in ("lorakit", "PEFT", "loralib"))
            lines.append(f"| r={r} {mode} | {plain_ms:.1f} | {cells} | {limit:.3f} |")
    if args.profile:
        return
    md = (f"Layer d_in=d_out={args.d}, {args.tokens} tokens, fp32, {args.threads} thread(s), {args.rounds} rounds. "
          "Ratio to plain nn.Linear: median [p25-p75] / ratio of minima (MF: minor page faults per call).\n\n"
          "| case | nn.Linear ms | lorakit | PEFT | loralib | FLOP limit |\n|---|---|---|---|---|---|\n"
          + "\n".join(lines) + "\n")
    log(md)
    common.write(f"layer_bench_t{args.threads}" + ("_quick" if args.quick else ""), results, md)


if __name__ == "__main__":
    main()
