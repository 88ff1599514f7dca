"""CUDA check of lorakit's quantized bases (run when a GPU is lent; ~2 min on one GPU).

    python bench/gpu_check_quant.py [OUT.json] [--smollm2-config DIR]   # exits 1 if a check failed

``--smollm2-config DIR``: build SmolLM2-135M from its config.json with random weights instead of
loading the embedded checkpoint (memory and time do not depend on the weights' values; for a
machine where the model package is not installed).

The code paths are the CPU ones (lorakit.quantize picks the model's device; bitsandbytes' CUDA
kernels run the base): this script checks that they hold there. For nf4 / fp4 (bf16 compute,
double quantization) and int8 on a tiny model on CUDA: forward and gradients of x, A, B against the
float64 formula on bitsandbytes' dequantized weight, no gradient for the quantized weight, mixed
batches against each row run alone, PEFT 0.21 loading lorakit's file on the same quantized base
(and back), merge refused, merge_and_unload(dequantize=True) bit-exact to W_deq + ΔW rounded once.
Then SmolLM2-135M all-linear r=8 training steps, fp32 base vs NF4 base: peak CUDA memory and
s/step (medians), lorakit vs PEFT on the NF4 base.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit  # noqa: E402
from lorakit import quant  # noqa: E402

DEV = torch.device("cuda")
results: dict = {}


def check(name: str, ok: bool, detail="") -> None:
    results[name] = {"ok": bool(ok), "detail": str(detail)}
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 8)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def oracle(model, x):
    def lin(module, h):
        base = module.base_layer if isinstance(module, lorakit.LoraLayer) else module
        w = quant.dequantized_weight(base, torch.float64) if quant.format_of(base) else base.weight.double()
        if isinstance(module, lorakit.LoraLayer):
            for n in module.active:
                w = w + module.scale[n] * module.lora_B[n].double() @ module.lora_A[n].double()
        return nn.functional.linear(h, w, base.bias.double())
    return lin(model.head, lin(model.down, torch.relu(lin(model.up, x.double()))))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


def tiny_checks(fmt: str) -> None:
    torch.manual_seed(0)
    kw = dict(compute_dtype=torch.bfloat16, double_quant=True) if fmt != "int8" else {}
    base = lorakit.quantize(Tiny().to(DEV), fmt, **kw)
    check(f"{fmt}: quantized on cuda", all(quant.dequantized_weight(m).is_cuda for m in (base.up, base.down)))
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=8, targets="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(4, 16, 128, device=DEV, requires_grad=True)
    y = model(x)
    tol = 2e-2 if fmt != "int8" else 2e-2  # bf16 compute (4-bit) / int8 activations on CUDA
    check(f"{fmt}: forward vs float64 formula", rel(y, oracle(model, x)) < tol, rel(y, oracle(model, x)))
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    layers = list(lorakit.lora_layers(model))
    factors = [t for _, layer in layers for t in (layer.lora_A["default"], layer.lora_B["default"])]
    names = ["x"] + [f"{path}.{ab}" for path, _ in layers for ab in ("A", "B")]
    ref = torch.autograd.grad(oracle(model, x64).sum(), [x64, *factors])
    ours = [x.grad] + [p.grad for p in factors]
    err_ours = [rel(g, r) for g, r in zip(ours, ref)]
    # A figure: with bf16 compute (4-bit) or fp16 activations (int8) the gradients differ from the
    # float64 formula by those formats' rounding; the pass/fail is against PEFT on the same base below.
    print(f"     {fmt}: grads vs float64, per tensor: " + ", ".join(f"{n} {e:.2g}" for n, e in zip(names, err_ours)))
    check(f"{fmt}: no grad for the quantized weight",
          all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n))
    model.eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["up"]), adapter="b")
    with torch.no_grad():
        alone = {}
        for n in ("default", "b"):
            lorakit.set_active(model, n)
            alone[n] = model(x)
        with lorakit.disabled(model):
            alone[None] = model(x)
        with lorakit.mixed(model, ["default", "b", None, "default"]):
            mixed = model(x)
    worst = max(rel(mixed[i], alone[n][i]) for i, n in enumerate(["default", "b", None, "default"]))
    check(f"{fmt}: mixed batch vs rows alone", worst < 1e-5, worst)
    lorakit.set_active(model, "default")
    try:
        lorakit.merge(model)
        check(f"{fmt}: merge refused", False)
    except lorakit.LoraError:
        check(f"{fmt}: merge refused", True)
    import peft
    with tempfile.TemporaryDirectory() as d:
        lorakit.save(model, d, adapter="default")
        flagged = copy.deepcopy(base)
        setattr(flagged, "is_loaded_in_8bit" if fmt == "int8" else "is_loaded_in_4bit", True)
        pm = peft.PeftModel.from_pretrained(flagged, d, is_trainable=True).eval()
        xp = x.detach().clone().requires_grad_()
        pm(xp).sum().backward()
        inner = pm.base_model.model
        theirs = [xp.grad] + [getattr(inner.get_submodule(path), f"lora_{ab}")["default"].weight.grad
                              for path, _ in layers for ab in ("A", "B")]
        err_theirs = [rel(g, r) for g, r in zip(theirs, ref)]
        print(f"     {fmt}: PEFT's grads vs float64, per tensor: "
              + ", ".join(f"{n} {e:.2g}" for n, e in zip(names, err_theirs)))
        worst = max(e / (t + 1e-3) for e, t in zip(err_ours, err_theirs))
        check(f"{fmt}: grads x, A, B no further from float64 than PEFT's (x1.5)", worst <= 1.5, worst)
        lorakit.delete(model, "b")
        with torch.no_grad():
            check(f"{fmt}: PEFT loads lorakit's file, same outputs", rel(pm(x), model(x)) < 1e-2, rel(pm(x), model(x)))
    expected = {}
    for path, layer in lorakit.lora_layers(model):
        w = quant.dequantized_weight(layer.base_layer, torch.float64)
        expected[path] = (w + layer.delta("default", compute=torch.float64))
    plain = lorakit.merge_and_unload(model, dequantize=True)
    exact = all(torch.equal(getattr(plain, p).weight, w.to(getattr(plain, p).weight.dtype)) for p, w in expected.items())
    check(f"{fmt}: merge_and_unload(dequantize=True) = W_deq + ΔW rounded once", exact)


def smollm2_steps(config_dir: str | None) -> None:
    """Variants are ``<base>-<library>[-gc]``; ``-gc``: transformers' gradient checkpointing
    (non-reentrant), as the QLoRA recipe (PEFT's prepare_model_for_kbit_training) turns it on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def load():
        if config_dir:
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
        from lorakit.builtin import smollm2_path
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)

    ids = torch.randint(100, 49000, (8, 512), device=DEV)
    rows = {}
    import gc
    for variant in ("fp32-lorakit", "bf16-lorakit", "int8-lorakit", "nf4-lorakit", "nf4-peft",
                    "fp32-lorakit-gc", "nf4-lorakit-gc", "nf4-peft-gc"):
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()  # what earlier variants left (should be ~0), subtracted
        torch.cuda.reset_peak_memory_stats()
        base, library = variant.split("-")[:2]
        model = load().to(DEV, torch.bfloat16 if base == "bf16" else torch.float32)
        if base in ("nf4", "int8"):
            kw = dict(compute_dtype=torch.bfloat16) if base == "nf4" else {}
            lorakit.quantize(model, base, **kw)
            setattr(model, "is_loaded_in_4bit" if base == "nf4" else "is_loaded_in_8bit", True)
        if variant.endswith("-gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        loaded = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        if library == "lorakit":
            lorakit.inject(model, lorakit.LoraConfig(r=8, targets="all-linear"))
        else:
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        rows[variant] = {"left_by_earlier_mb": before / 2**20, "loaded_mb": loaded / 2**20,
                         "train_peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20,
                         "step_s": statistics.median(times)}
        print(variant, json.dumps(rows[variant]), flush=True)
        del model, opt
    results["smollm2"] = rows
    for nf4 in ("nf4-lorakit", "nf4-lorakit-gc"):  # a figure, not a pass/fail of the code
        print(f"{nf4} training peak / fp32-lorakit's: "
              f"{rows[nf4]['train_peak_mb'] / rows['fp32-lorakit']['train_peak_mb']:.3f}", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    args = sys.argv[1:]
    config_dir = None
    if "--smollm2-config" in args:
        i = args.index("--smollm2-config")
        config_dir = args[i + 1]
        del args[i:i + 2]
    for fmt in ("nf4", "fp4", "int8"):
        tiny_checks(fmt)
    smollm2_steps(config_dir)
    out = Path(args[0]) if args else Path(__file__).parent / "results" / "gpu_check_quant.json"
    out.write_text(json.dumps(results, indent=1))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"{len(failed)} failed: {failed}" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
