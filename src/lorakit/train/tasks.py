"""The two ready-made fine-tuning tasks behind ``lorakit train``: sequence classification and
instruction tuning of a causal LM. Each loads a model and data, injects LoRA (or trains fully,
for comparison), trains with :func:`~lorakit.train.loop.fit`, evaluates on a held-out test set
before and after, and writes the adapter, ``metrics.jsonl``, ``summary.json`` and ``curve.png``.

Both run on ``device`` and, under torchrun, data-parallel: every rank loads the same model, trains
on its share of each batch and evaluates its share of each held-out set (the sums are reduced);
rank 0 alone logs and writes files. ``fsdp="sharded"`` or ``"replicated"`` (the adapters' layout)
shards the model with FSDP2 after injection (:func:`lorakit.distributed.fully_shard_model`):
every rank then runs the same number of forwards in evaluation (padded with uncounted batches)
and generation, and saving gathers the adapter.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import distributed as D
from ..api import inject
from ..api import load as load_adapter
from ..api import save as save_adapter
from ..config import LoraConfig, LoraError
from ..pretrained import load_model, model_path  # noqa: F401  (model_path: re-exported)
from .data import (  # noqa: F401 (re-exported)
    BBC_PROMPT,
    TOPICS,
    LabelledText,
    PromptCompletion,
    bbc_headline_task,
    chat_prompt,
    classification_splits,
    collate,
    encode_causal,
    encode_classification,
    prompt_splits,
)
from .lm_loss import causal_lm_loss, head_is_plain
from .loop import TrainConfig, _to_device, fit, peak_memory_mb

__all__ = ["LoraSpec", "classify", "causal_lm", "load_model", "generate", "predict", "bbc_headline_task",
           "prepare_out", "adapter_task", "TASK_NAME"]

TASK_NAME = "lorakit_task.json"  # beside the PEFT files of a trained adapter: its task, base model and labels
RUN_FILES = ("summary.json", "metrics.jsonl", "curve.png", "checkpoint", "checkpoint.old", "checkpoint.tmp",
             "best", "adapter")



@dataclass(frozen=True)
class LoraSpec:
    """Which adapter to train; ``full=True`` trains every weight instead (the baseline)."""

    targets: tuple[str, ...] = ("query", "value")
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    full: bool = False
    dora: bool = False  # use_dora
    init: str = "kaiming"  # lorakit.INITS: "pissa" / "olora" rewrite W (lorakit.variants.rewriting_inits)
    rslora: bool = False  # scale alpha/sqrt(r)
    trainable_tokens: tuple[int, ...] | None = None  # trainable_token_indices: embedding rows trained as they are


def prepare_out(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Check the output folder before any work: a finished run (``summary.json``) or an unfinished one
    (``checkpoint/``) there is refused (:class:`LoraError`) unless ``resume`` (continue it) or ``overwrite``
    (replace it: :func:`_clear_run` deletes lorakit's run files, nothing else, once training starts)."""
    out = Path(out)
    if resume and overwrite:
        raise LoraError("--resume continues the run in the output folder and --overwrite deletes it; pass one")
    if out.exists() and not out.is_dir():
        raise LoraError(f"output folder {out} is a file")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not (resume or overwrite) and "summary.json" in present:
        raise LoraError(f"{out} holds a finished run (summary.json); pass --overwrite to replace it, or choose "
                        "another --out")
    if not (resume or overwrite) and present:
        raise LoraError(f"{out} holds an unfinished run ({', '.join(present)}); continue it with --resume, or "
                        "pass --overwrite to start over")
    return out


def _clear_run(out: Path) -> None:
    """Delete the files of an earlier run in ``out`` (``--overwrite``), just before training starts."""
    for name in RUN_FILES:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        elif (out / name).exists():
            (out / name).unlink()


def _write_task(folder: Path, task: str, model_spec: str, **fields) -> None:
    spec = model_spec if model_spec.startswith("builtin:") else str(Path(model_spec).resolve())
    (folder / TASK_NAME).write_text(json.dumps({"task": task, "model": spec, **fields}, indent=2))


def adapter_task(folder: str | Path) -> dict:
    """What an adapter folder was trained for: ``lorakit_task.json`` if present (task, model, labels, ...),
    else ``{"task": "classify"}`` for a folder that saves a ``classifier``/``score`` head, else ``{}``."""
    folder = Path(folder)
    if (folder / TASK_NAME).is_file():
        return json.loads((folder / TASK_NAME).read_text())
    config = folder / "adapter_config.json"
    saved = (json.loads(config.read_text()).get("modules_to_save") or []) if config.is_file() else []
    return {"task": "classify"} if {"classifier", "score"} & set(saved) else {}


def _prepare(model: nn.Module, lora: LoraSpec, saved: Sequence[str]) -> None:
    if lora.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    targets = lora.targets[0] if lora.targets == ("all-linear",) else list(lora.targets)
    inject(model, LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=targets,
                             modules_to_save=tuple(saved), use_dora=lora.dora, init=lora.init,
                             use_rslora=lora.rslora, trainable_token_indices=lora.trainable_tokens))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    key = "accuracy" if val and "accuracy" in val[0] else None
    if key:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r[key] for r in val], "s--", color="tab:green", label="val accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish(out: Path, model: nn.Module, lora: LoraSpec, records: list, result: dict, title: str) -> dict:
    if D.is_main():
        _plot(records, out / "curve.png", title)
        (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def _main_log(log):
    """``log`` on rank 0, silence on the other ranks."""
    return log if D.is_main() else (lambda *args, **kwargs: None)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _save(model: nn.Module, path: Path) -> bool:
    """Save the adapter from rank 0 (a sharded model: every rank gathers, rank 0 writes); True on rank 0."""
    if D.is_main() or D.is_sharded(model):
        save_adapter(model, path)
    return D.is_main()


def _save_best(lora: LoraSpec) -> Callable[[nn.Module, Path], None]:
    if lora.full:  # full fine-tuning: keep the best weights in memory (no adapter to save)
        def keep(model, path):
            keep.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        keep.state = None
        return keep
    return _save


def _shard(model: nn.Module, fsdp: str | None) -> None:
    """``fsdp`` (the adapters' layout): shard the injected model across the ranks (FSDP2)."""
    if fsdp:
        D.fully_shard_model(model, adapters=fsdp)


def _peaks() -> list[float]:
    """Every rank's peak memory (MB, :func:`peak_memory_mb`), on every rank."""
    return [float(t) for t in D.gather(torch.tensor(peak_memory_mb(), dtype=torch.float64))]


def _restore_best(model: nn.Module, out: Path, save_best, lora: LoraSpec) -> None:
    if lora.full:
        if save_best.state is not None:
            model.load_state_dict(save_best.state)
    elif (out / "best").exists():
        load_adapter(model, out / "best")


# -- classification --------------------------------------------------------------------------------
def classify(out: str | Path, model_spec: str = "builtin:minilm", data: str = "builtin:bbc",
             val_data: str | None = None, test_data: str | None = None, text_column: str = "text",
             label_column: str = "label", lora: LoraSpec = LoraSpec(), train: TrainConfig = TrainConfig(),
             max_length: int = 128, train_limit: int = 0, resume: bool = False, overwrite: bool = False,
             progress: bool = True, log=print, quantize: str | None = None,
             device: torch.device | str = "cpu", fsdp: str | None = None) -> dict:
    """Fine-tune a sequence classifier; default: all-MiniLM-L6-v2 on BBC News (5 topics).
    ``quantize``: hold the frozen base in "nf4", "fp4" or "int8" (QLoRA, :func:`lorakit.quantize`).
    ``fsdp``: under torchrun, shard the model with FSDP2, the adapters "sharded" or "replicated"
    (see the module's docstring).

    The data, then the output folder, are checked before the model loads
    (:class:`~lorakit.train.data.DataError`, :func:`prepare_out`)."""
    log = _main_log(log)
    splits = classification_splits(data, val_data, test_data, text_column, label_column, train.seed, train_limit)
    out = prepare_out(out, resume, overwrite)
    labels = sorted({r.label for r in splits["train"]})
    torch.manual_seed(train.seed)  # the new head's init comes from the global RNG: seed it first
    model, tok = load_model(model_spec, "classify", num_labels=len(labels), log=log,
                          quantize=quantize)
    model.to(device)
    enc = {k: encode_classification(tok, v, labels, max_length) for k, v in splits.items()}
    pad = lambda items: collate(items, tok.pad_token_id)  # noqa: E731
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    torch.manual_seed(train.seed)
    _prepare(model, lora, head)
    _shard(model, fsdp)

    def evaluate(m, items=enc["val"]):
        return evaluate_classifier(m, items, tok.pad_token_id)

    model.eval()
    log(f"evaluating test accuracy before training ({len(enc['test'])} examples) ...")
    with torch.no_grad():
        before = evaluate(model, enc["test"])
    log(f"test accuracy before training: {before['accuracy']:.4f} ({len(enc['test'])} examples, "
        f"{len(labels)} labels: {', '.join(labels)})")
    trainable, total = _trainable(model), sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    save_best = _save_best(lora)
    if overwrite and D.is_main():
        _clear_run(out)
    t0 = time.perf_counter()
    records = fit(model, enc["train"], collate=pad, loss_fn=lambda m, b: m(**b).loss, cfg=train,
                  evaluate=evaluate, metric="accuracy", higher_is_better=True, out_dir=out, resume=resume,
                  on_best=save_best, progress=progress)
    seconds = time.perf_counter() - t0
    D.barrier()  # rank 0 has written best/ before the others read it
    _restore_best(model, out, save_best, lora)
    log(f"evaluating test accuracy after training ({len(enc['test'])} examples) ...")
    with torch.no_grad():
        after = evaluate(model, enc["test"])
    steps = max(r["step"] for r in records)
    result = {"task": "classify", "model": model_spec, "data": data, "labels": labels,
              "method": "full" if lora.full else f"lora r={lora.r} {','.join(lora.targets)}",
              "test_accuracy_before": before["accuracy"], "test_accuracy": after["accuracy"],
              "test_loss": after["loss"], "trainable_params": trainable, "total_params": total,
              "train_seconds": seconds, "seconds_per_step": seconds / max(steps, 1),
              "peak_memory_mb": peak_memory_mb(), "peak_memory_mb_per_rank": _peaks(), "steps": steps,
              "lora": asdict(lora), "train": asdict(train)}
    if not lora.full and _save(model, out / "adapter"):
        _write_task(out / "adapter", "classify", model_spec, labels=labels, max_length=max_length)
        result["adapter_bytes"] = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    log(f"test accuracy after training: {after['accuracy']:.4f}  (before {before['accuracy']:.4f})")
    log(f"time {seconds:.0f} s ({result['seconds_per_step']:.2f} s/step), peak memory {result['peak_memory_mb']:.0f} MB")
    log(f"wrote {out}/adapter, metrics.jsonl, curve.png, summary.json")
    return _finish(out, model, lora, records, result, f"{model_spec} on {data}: {result['method']}")


def evaluate_classifier(model: nn.Module, items: Sequence, pad_id: int, batch_size: int = 64) -> dict:
    """Mean loss and accuracy of a sequence classifier over encoded ``items`` (call under no_grad).

    Under torchrun each rank scores its share and the sums are reduced: every rank gets the totals."""
    correct, loss, n = 0, 0.0, 0
    for chunk, counted in D.shard_batches(items, batch_size, pad=D.is_sharded(model)):
        batch = _to_device(collate(chunk, pad_id), _model_device(model))
        result = model(**batch)
        if counted:
            loss += result.loss.item() * len(chunk)
            correct += (result.logits.argmax(-1) == batch["labels"]).sum().item()
            n += len(chunk)
    loss, correct, n = D.reduce_sums([loss, correct, n])
    return {"loss": loss / n, "accuracy": correct / n}


_classification_data = classification_splits  # the name bench/ scripts use


# -- causal LM ----------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 16,
             shard: bool = False) -> list[str]:
    """Greedy answers to chat-formatted ``prompts`` (left-padded batches).

    ``shard`` (under torchrun): answer only this rank's share of ``prompts``
    (:func:`lorakit.distributed.shard`). A sharded (FSDP2) model, whose every forward is a
    collective, then runs as many batches as every other rank (the extra ones unanswered), and
    decodes in step with the other ranks (``synced_gpus``)."""
    tok.padding_side = "left"
    sharded = D.is_sharded(model)
    batches = (D.shard_batches(list(prompts), batch_size, pad=sharded) if shard
               else ((chunk, True) for chunk in _batches(list(prompts), batch_size)))
    answers = []
    for chunk, counted in batches:
        enc = tok([chat_prompt(tok, p) for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = _to_device(dict(enc), _model_device(model))
        outs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              synced_gpus=sharded)
        if counted:
            answers += tok.batch_decode(outs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def exact_match(model, tok, rows: Sequence[PromptCompletion], max_new_tokens: int = 6) -> float:
    """Share of rows whose answer's first word equals the completion (case and punctuation ignored).

    Under torchrun each rank answers its share of the rows; the counts are reduced."""
    norm = lambda s: (s.strip().split() or [""])[0].strip(".,:;!\"'").lower()  # noqa: E731
    mine = D.shard(rows)
    answers = generate(model, tok, [r.prompt for r in rows], max_new_tokens, shard=True)
    hits, n = D.reduce_sums([sum(norm(a) == norm(r.completion) for a, r in zip(answers, mine)), len(mine)])
    return hits / n


def causal_lm(out: str | Path, model_spec: str = "builtin:smollm2", data: str = "builtin:bbc-headlines",
              val_data: str | None = None, test_data: str | None = None, lora: LoraSpec = LoraSpec(("all-linear",)),
              train: TrainConfig = TrainConfig(epochs=1, batch_size=8, lr=1e-3), max_length: int = 96,
              train_limit: int = 0, eval_limit: int = 50, resume: bool = False, overwrite: bool = False,
              progress: bool = True, log=print, quantize: str | None = None,
              device: torch.device | str = "cpu", fsdp: str | None = None) -> dict:
    """Instruction-tune a causal LM on prompt/completion pairs (prompt tokens masked out of the loss);
    scores exact match of greedy answers on (the first ``eval_limit`` of) the test set before and after.
    ``eval_limit`` also bounds the validation set; 0: no limit."""
    log = _main_log(log)
    if eval_limit < 0 or train_limit < 0:
        raise LoraError(f"train_limit and eval_limit must be >= 0 (0: no limit), got {train_limit}, {eval_limit}")
    splits = prompt_splits(data, val_data, test_data, train.seed, train_limit, eval_limit)  # the data, then the folder
    out = prepare_out(out, resume, overwrite)
    torch.manual_seed(train.seed)
    model, tok = load_model(model_spec, "causal-lm", log=log, quantize=quantize)
    model.to(device)
    enc = {k: encode_causal(tok, splits[k], max_length) for k in ("train", "val")}  # (test: prompts only)
    model.eval()
    log(f"evaluating exact match before training: greedy answers to {len(splits['test'])} test prompts "
        "(--eval-limit) ...")
    before = exact_match(model, tok, splits["test"])
    log(f"test exact match before training: {before:.4f} ({len(splits['test'])} examples)")
    torch.manual_seed(train.seed)
    _prepare(model, lora, ())
    _shard(model, fsdp)
    pad = lambda items: collate(items, tok.pad_token_id)  # noqa: E731
    # the loss from the labelled positions' logits only, a chunk at a time (lm_loss.py), where it is
    # the model's own loss; else (or on an FSDP-sharded model, whose root must run) transformers' loss
    plain = not D.is_sharded(model) and head_is_plain(model, _to_device(pad(enc["train"][:1]), _model_device(model)))
    loss_fn = causal_lm_loss if plain else (lambda m, b: m(**b).loss)

    def evaluate(m):
        losses, tokens = 0.0, 0
        for chunk, counted in D.shard_batches(enc["val"], 16, pad=D.is_sharded(m)):
            batch = _to_device(pad(chunk), _model_device(m))
            n = (batch["labels"][:, 1:] != -100).sum().item() if counted else 0
            losses += loss_fn(m, batch).item() * n
            tokens += n
        losses, tokens = D.reduce_sums([losses, tokens])
        return {"loss": losses / tokens, "perplexity": math.exp(losses / tokens)}

    trainable, total = _trainable(model), sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    with torch.no_grad():
        val_before = evaluate(model)["loss"]  # a new adapter starts as the base model (B = 0)
    log(f"validation loss before training: {val_before:.4f} ({len(enc['val'])} examples)")
    save_best = _save_best(lora)
    if overwrite and D.is_main():
        _clear_run(out)
    t0 = time.perf_counter()
    records = fit(model, enc["train"], collate=pad, loss_fn=loss_fn, cfg=train, evaluate=evaluate,
                  metric="loss", out_dir=out, resume=resume, on_best=save_best, progress=progress)
    seconds = time.perf_counter() - t0
    D.barrier()  # rank 0 has written best/ before the others read it
    _restore_best(model, out, save_best, lora)
    log(f"evaluating exact match after training: greedy answers to {len(splits['test'])} test prompts ...")
    after = exact_match(model, tok, splits["test"])
    steps = max(r["step"] for r in records)
    result = {"task": "causal-lm", "model": model_spec, "data": data, "test_exact_match_before": before,
              "test_exact_match": after, "val_loss_before": val_before,
              "val_loss": min(r["loss"] for r in records if r["split"] == "val"),
              "trainable_params": trainable, "total_params": total,
              "train_examples": len(splits["train"]), "test_examples": len(splits["test"]),
              "train_seconds": seconds, "seconds_per_step": seconds / max(steps, 1), "steps": steps,
              "peak_memory_mb": peak_memory_mb(), "peak_memory_mb_per_rank": _peaks(), "lora": asdict(lora),
              "train": asdict(train)}
    if not lora.full and _save(model, out / "adapter"):
        _write_task(out / "adapter", "causal-lm", model_spec)
    log(f"test exact match after training: {after:.4f}  (before {before:.4f})")
    log(f"time {seconds:.0f} s, peak memory {result['peak_memory_mb']:.0f} MB; wrote {out}/adapter")
    return _finish(out, model, lora, records, result, f"{model_spec} on {data}")


@torch.no_grad()
def predict(model: nn.Module, tok, texts: Sequence[str], labels: Sequence[str], max_length: int = 128,
            batch_size: int = 64) -> list[dict[str, float]]:
    """Each text's probability per label (softmax of a sequence classifier's logits)."""
    rows = [LabelledText(t, labels[0]) for t in texts]
    items = encode_classification(tok, rows, labels, max_length)
    probs = []
    for chunk in _batches(items, batch_size):
        batch = _to_device(collate(chunk, tok.pad_token_id), _model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if logits.shape[-1] != len(labels):
            raise LoraError(f"the model has {logits.shape[-1]} outputs but the adapter names {len(labels)} labels")
        probs += [dict(zip(labels, p)) for p in logits.float().softmax(-1).tolist()]
    return probs
