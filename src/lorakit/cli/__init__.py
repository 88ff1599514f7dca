"""``lorakit`` command line: ``train``, ``predict``, ``generate``, ``inspect``, ``serve``, ``combine``,
``extract``, ``export`` (their options in :mod:`.parser`). Errors go to stderr with exit 2 (bad input) or 1
(failure); ``--help`` on every command."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from .parser import COMBINE_METHODS, OUT, build_parser  # noqa: F401  (COMBINE_METHODS: re-exported)

__all__ = ["main"]

CONFIG_NAME = "adapter_config.json"  # lorakit.files.format.CONFIG_NAME, PEFT's (no torch import)


class _UsageError(ValueError):
    """An option that does not apply to the chosen task (exit 2)."""


def _launch(n: int, argv: list[str]) -> int:
    """``lorakit train --nproc N ...``: the same command under torchrun, one process per rank."""
    import subprocess
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "lorakit.cli", *rest]
    print(f"lorakit train: starting {n} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return 0 if subprocess.run(cmd).returncode == 0 else 1


def _train(args) -> int:
    """``lorakit train``: the options, then the data files (without importing torch: a bad input is
    answered at once), then the output folder (in the task), and only then the model and training."""
    lm = args.task == "causal-lm"
    if args.full and args.quantize:
        raise _UsageError("--full trains every weight; a quantized (--quantize) weight cannot be trained: use LoRA")
    if args.full and args.dora:
        raise _UsageError("--dora is a LoRA variant; --full trains every weight instead: use one of them")
    if args.resume and args.overwrite:
        raise _UsageError("--resume continues the run in the output folder and --overwrite deletes it; pass one")
    not_here = [o for o, v in ((("--eval-limit", args.eval_limit),) if not lm else
                               (("--text-column", args.text_column), ("--label-column", args.label_column)))
                if v is not None]
    if not_here:
        raise _UsageError(f"{', '.join(not_here)} only appl{'y' if len(not_here) > 1 else 'ies'} to --task "
                          f"{'causal-lm' if not lm else 'classify'}")
    for name, least in (("train_limit", 0), ("eval_limit", 0), ("max_steps", 0), ("max_length", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise _UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if args.fsdp:
        clash = [o for o, v in (("--full", args.full), ("--quantize", args.quantize)) if v]
        if clash:
            raise _UsageError(f"--fsdp shards LoRA training; it does not combine with {', '.join(clash)}")
        if args.nproc == 1 and "RANK" not in os.environ:
            raise _UsageError("--fsdp shards the model across processes: start several with --nproc N (or torchrun)")
    if args.full and (args.rslora or args.init != "kaiming" or args.lora_plus_ratio != 1.0):
        raise _UsageError("--rslora, --init and --lora-plus-ratio configure LoRA; --full trains every weight")
    _check_train_data(args, lm)
    if args.nproc > 1:
        if "RANK" in os.environ:
            raise _UsageError("--nproc starts torchrun; under torchrun leave it out (--nproc-per-node sets it)")
        return _launch(args.nproc, args.argv)
    _set_threads(args)
    from .. import distributed as D
    from ..train.loop import TrainConfig
    from ..train.tasks import LoraSpec

    device = D.resolve_device(args.device)
    targets = tuple((args.targets or ("all-linear" if lm else "query,value")).split(","))
    lora = LoraSpec(targets=targets, r=args.rank, alpha=args.alpha, dropout=args.dropout, full=args.full,
                    dora=args.dora, init=args.init, rslora=args.rslora, trainable_tokens=args.trainable_tokens)
    checkpointing = bool(args.quantize) if args.grad_checkpointing is None else args.grad_checkpointing
    train = TrainConfig(epochs=args.epochs or (1 if lm else 3), batch_size=args.batch_size or (8 if lm else 16),
                        lr=args.lr or (1e-3 if not args.full else 5e-5), lora_plus_ratio=args.lora_plus_ratio,
                        schedule=args.schedule, warmup=args.warmup, grad_accum=args.grad_accum,
                        max_grad_norm=args.max_grad_norm or None, bf16=args.bf16,
                        grad_checkpointing=checkpointing, seed=args.seed, eval_every=args.eval_every,
                        max_steps=args.max_steps)
    common = dict(out=args.out or OUT[args.task], val_data=args.val_data, test_data=args.test_data, lora=lora,
                  train=train, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                  quantize=args.quantize, device=device, fsdp=args.fsdp,
                  log=functools.partial(print, flush=True))  # log lines reach a log file at once
    D.setup(device, args.dist_timeout)
    try:
        _run_task(args, lm, common)
    finally:
        D.teardown()
    return 0


def _check_train_data(args, lm: bool) -> None:
    """Read and split the data files as the task will, without torch: a bad file is refused at once, before
    the output folder is looked at, torchrun starts or the model loads (the task reads them again)."""
    from ..train.data import classification_splits, prompt_splits
    if not any(f and not f.startswith("builtin:") for f in (args.data, args.val_data, args.test_data)):
        return
    if lm:
        prompt_splits(args.data or "builtin:bbc-headlines", args.val_data, args.test_data, args.seed)
    else:
        classification_splits(args.data or "builtin:bbc", args.val_data, args.test_data, args.text_column or "text",
                              args.label_column or "label", args.seed, args.train_limit or 0)


def _set_threads(args) -> None:
    """``--threads``: torch's CPU threads (imports torch: call it once the inputs are checked)."""
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def _run_task(args, lm: bool, common: dict) -> None:
    from ..train.tasks import causal_lm, classify
    if lm:
        data = args.data or "builtin:bbc-headlines"
        limit = args.train_limit if args.train_limit is not None else (600 if data == "builtin:bbc-headlines" else 0)
        causal_lm(model_spec=args.model or "builtin:smollm2", data=data, max_length=args.max_length or 96,
                  train_limit=limit, eval_limit=50 if args.eval_limit is None else args.eval_limit, **common)
    else:
        classify(model_spec=args.model or "builtin:minilm", data=args.data or "builtin:bbc",
                 text_column=args.text_column or "text", label_column=args.label_column or "label",
                 max_length=args.max_length or 128, train_limit=args.train_limit or 0, **common)


def _adapter_folder(path: str) -> Path:
    """``path`` if it is an adapter folder, else FileNotFoundError (without importing torch)."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no {CONFIG_NAME}); a trained adapter is "
                                f"in OUT/adapter, e.g. {OUT['classify']}/adapter")
    return folder


def _predict(args) -> int:
    import json

    folder = _adapter_folder(args.adapter)
    from ..api import load
    from ..train.data import read_records
    from ..train.tasks import adapter_task, load_model, predict

    task = adapter_task(folder)
    if task.get("task") != "classify":
        raise _UsageError(f"{folder} is not a classifier adapter (task: {task.get('task', 'unknown')}); "
                          "use lorakit generate --adapter for a causal-LM adapter")
    if not task.get("labels"):
        raise _UsageError(f"{folder} has no label names ({folder}/lorakit_task.json is missing); "
                          "retrain it with lorakit train to predict")
    if bool(args.texts) == bool(args.file):
        raise _UsageError("give texts or --file FILE (a .csv/.jsonl with a text column), not both or neither")
    if args.file:
        roles = {args.text_column: "the text column, set by --text-column"}
        texts = [row[args.text_column] for _, row in read_records(args.file, [args.text_column], roles=roles)]
    else:
        texts = args.texts
    from ..distributed import resolve_device
    device = resolve_device(args.device)
    model, tok = load_model(args.model or task["model"], "classify", num_labels=len(task["labels"]))
    _hold_base(model, folder, args)
    load(model, folder, allow_precision_change=args.allow_precision_change)
    model.to(device)
    model.eval()
    for text, probs in zip(texts, predict(model, tok, texts, task["labels"], task.get("max_length", 128))):
        label = max(probs, key=probs.get)
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": probs}))
        else:
            print(f"{label}\t{probs[label]:.4f}\t{' '.join(text.split())[:80]}")
    return 0


def _hold_base(model, folder: Path | None, args) -> None:
    """Quantize the freshly loaded base as ``--quantize`` says, else as the adapter was trained (its
    file's record); an adapter trained on another precision is refused unless --allow-precision-change."""
    from ..pretrained import apply_base_precision, plan_base_precision
    plan = plan_base_precision(model, {"adapter": folder} if folder else {}, args.quantize,
                               args.allow_precision_change)
    if plan.refused:
        raise _UsageError(f"{folder}: {plan.refused['adapter']}")
    apply_base_precision(model, plan)


def _generate(args) -> int:
    import json

    folder = _adapter_folder(args.adapter) if args.adapter else None
    import torch

    from ..api import load
    from ..train.tasks import adapter_task, generate, load_model

    model_spec = args.model
    if args.adapter:
        task = adapter_task(folder)
        if task.get("task") == "classify":
            raise _UsageError(f"{folder} is a classifier adapter; use lorakit predict --adapter {folder} TEXT")
        base = task.get("model") or json.loads((folder / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if model_spec is None and base and (base.startswith("builtin:") or Path(base).is_dir()):
            model_spec = base
    from ..distributed import resolve_device
    device = resolve_device(args.device)
    model, tok = load_model(model_spec or "builtin:smollm2", "causal-lm")
    _hold_base(model, folder, args)
    if args.adapter:
        load(model, folder, allow_precision_change=args.allow_precision_change)
    model.to(device)
    model.eval()
    torch.manual_seed(args.seed)
    for answer in generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens):
        print(answer.strip())
    return 0


def _inspect(args) -> int:
    import json

    folder = _adapter_folder(args.adapter)
    from safetensors import safe_open

    from ..files.format import WEIGHTS_NAME
    from ..train.tasks import adapter_task

    config = json.loads((folder / CONFIG_NAME).read_text())
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    n = sum(int(__import__("math").prod(s)) for s in shapes.values())
    print(f"{folder}: r={config['r']} alpha={config['lora_alpha']} targets={config.get('target_modules')} "
          f"modules_to_save={config.get('modules_to_save')}")
    print(f"{len(shapes)} tensors, {n:,} parameters, {(folder / WEIGHTS_NAME).stat().st_size:,} bytes")
    task = adapter_task(folder)
    if task:
        kind = task.get("task", task.get("architecture", "unknown"))
        print(f"task {kind}, base model {task.get('model', config.get('base_model_name_or_path'))}"
              + (f", labels: {', '.join(task['labels'])}" if task.get("labels") else ""))
    _inspect_spectrum(args, folder)
    return 0


def _inspect_spectrum(args, folder: Path) -> None:
    """``inspect``'s per-module table: rank, largest singular values of ΔW, effective rank; the plot."""
    from ..ops.extraction import effective_rank, plot_spectra, spectra
    found = spectra(folder)
    print(f"{'module':<56} {'rank':>4} {'sigma_1':>10} {'sigma_r':>10} {f'rank@{args.energy:g}':>9}")
    for path, s in found.items():
        print(f"{path:<56} {s.numel():>4} {float(s[0]):>10.4g} {float(s[-1]):>10.4g} "
              f"{effective_rank(s, args.energy):>9}")
    if args.spectrum:
        plot_spectra(found, args.spectrum, title=f"{folder}: singular values of dW = s*B*A")
        print(f"wrote {args.spectrum}")


def _load_base(folder: Path, model_spec: str | None):
    """The base model an adapter folder belongs to (``--model``, else its recorded base), by its task."""
    import json

    from ..train.tasks import adapter_task, load_model
    task = adapter_task(folder)
    base = model_spec or task.get("model") or json.loads((folder / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if not base:
        raise _UsageError(f"{folder} does not record its base model; give --model")
    if task.get("task") == "classify":
        return load_model(base, "classify", num_labels=len(task.get("labels") or ()) or 2)[0], base, task
    return load_model(base, "causal-lm")[0], base, task


def _combine(args) -> int:
    import json

    folders = [_adapter_folder(a) for a in args.adapters]
    from ..api import combine, load, save
    from ..train.tasks import TASK_NAME
    if len(args.weights) != len(folders):
        raise _UsageError(f"--weights needs one weight per adapter: {len(folders)} adapters, "
                          f"{len(args.weights)} weights")
    model, _, task = _load_base(folders[0], args.model)
    names = [f"a{i}" for i in range(len(folders))]
    for name, folder in zip(names, folders):
        load(model, folder, adapter=name)
    report = combine(model, dict(zip(names, args.weights)), method=args.method, adapter="combined",
                     rank=args.rank, density=args.density, majority_sign=args.majority_sign, seed=args.seed,
                     missing=args.missing)
    if args.table:
        print(report)
    out = save(model, args.out, adapter="combined")
    if task:
        (out / TASK_NAME).write_text(json.dumps(task, indent=2))
    print(_combine_summary(folders, args.weights, args.method, report.ranks, report.errors, out))
    return 0


def _ranks(ranks) -> str:
    """``r=8``, or ``r=4..16`` where the modules' ranks differ."""
    return f"r={min(ranks)}" + (f"..{max(ranks)}" if min(ranks) != max(ranks) else "")


def _combine_summary(folders: list[Path], weights: list[float], method: str, ranks: dict[str, int],
                     errors: dict[str, float], out: Path) -> str:
    """``lorakit combine``'s one line: what was combined, how, the result's ranks and modules, where."""
    import json
    configs = [json.loads((folder / CONFIG_NAME).read_text()) for folder in folders]
    inputs = [[c["r"], *(c.get("rank_pattern") or {}).values()] for c in configs]
    how = method
    if method == "cat":
        how += (" (factors concatenated, so the ranks add up: "
                + " + ".join(_ranks(r) for r in inputs) + f" -> {_ranks(ranks.values())})")
        if len({f.resolve() for f in folders}) < len(folders):
            how += ("; an adapter given twice adds rank that is redundant (its factors appear twice): "
                    "--method svd --rank N keeps the same sum at a lower rank")
    else:
        how += f", {_ranks(ranks.values())}"
    return (f"combined {len(folders)} adapters ({', '.join(f'{f} x {w:g}' for f, w in zip(folders, weights))}) "
            f"by {how}; {len(ranks)} modules, largest relative error {max(errors.values(), default=0):.1e}; "
            f"wrote {out}")


def _extract(args) -> int:
    """``lorakit extract``: both models loaded as the tuned folder's class (or ``--task``'s), then the SVD."""
    import json

    from ..api import extract, save
    from ..pretrained import load_tuned_pair
    from ..train.tasks import TASK_NAME
    saved = args.modules_to_save.split(",") if args.modules_to_save else None
    pair = load_tuned_pair(args.base, args.tuned, args.task, saved, log=print)
    targets = args.targets.split(",")
    report = extract(pair.base, pair.tuned, rank=args.rank, energy=args.energy,
                     targets=targets[0] if targets == ["all-linear"] else targets, modules_to_save=pair.modules_to_save)
    print(report)
    out = save(pair.base, args.out)
    (out / TASK_NAME).write_text(json.dumps(pair.record, indent=2))
    print(f"wrote {out}")
    return 0


def _export(args) -> int:
    """``lorakit export --format vllm IN OUT``: the summary line, each truncation's error, the warnings."""
    import warnings

    folder = _adapter_folder(args.adapter)
    from ..files.vllm import export_vllm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same notes are in the report, printed below
        report = export_vllm(folder, args.out, max_lora_rank=args.max_lora_rank, truncate=args.truncate)
    for path, error in report.truncated.items():
        print(f"  {path}: truncated to rank {args.max_lora_rank}, relative error {error:.3e}")
    for note in report.warnings:
        print(f"lorakit export: warning: {note}", file=sys.stderr)
    print(report)
    return 0


def _serve(args) -> int:
    _set_threads(args)
    from ..serve.server import run
    return run(args)


def main(argv: list[str] | None = None) -> int:
    """Run ``lorakit`` with ``argv`` (default: the command line); returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return {"train": _train, "predict": _predict, "generate": _generate, "inspect": _inspect,
                "serve": _serve, "combine": _combine, "extract": _extract, "export": _export}[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # lorakit's LoraError and DataError are ValueErrors
        print(f"lorakit {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        distributed = sys.modules.get("lorakit.distributed")  # imported by then if it raised (no torch import here)
        if distributed is None or not isinstance(e, distributed.RankFailure):
            raise
        print(f"lorakit {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lorakit: interrupted (resume with --resume)", file=sys.stderr)
        return 130
