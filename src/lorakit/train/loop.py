"""A small, deterministic training loop for models with lorakit adapters.

Only parameters with ``requires_grad`` train (the active adapters, plus any ``modules_to_save``).
AdamW with optional LoRA+ (B learns ``lora_plus_ratio`` × faster than A), warm-up then cosine /
linear decay, gradient accumulation and clipping, optional bf16 autocast and gradient
checkpointing. Checkpoints hold the trainable weights, the optimizer, the RNG states and the
position in the data (safetensors + JSON, written atomically, never pickled), so a killed run
resumed with ``resume=True`` ends with exactly the weights of an uninterrupted one.

Under torchrun (see :mod:`lorakit.distributed`) the same loop is data-parallel: ``batch_size`` is
the global batch of one optimizer step (before accumulation), the data order is the
single-process one, and each rank computes a contiguous share of every batch; the gradients are
summed across ranks, so N ranks take the steps one process would take (up to the order of the
floating-point sums). Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import distributed as D
from ..config import LoraError
from ..state import unwrap

__all__ = ["TrainConfig", "fit", "peak_memory_mb"]

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit` (all have sensible defaults for LoRA)."""

    epochs: float = 3.0
    batch_size: int = 16          # examples per optimizer step and micro-batch, over all ranks together
    lr: float = 5e-4
    lora_plus_ratio: float = 1.0
    weight_decay: float = 0.0
    warmup: float = 0.06          # fraction of all optimizer steps
    schedule: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0           # optimizer steps between evaluations; 0: once per epoch
    save_every: int = 0           # optimizer steps between checkpoints; 0: at each evaluation
    max_steps: int = 0            # stop after this many optimizer steps (0: no limit)
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 or self.lr <= 0 or self.lora_plus_ratio <= 0:
            raise ValueError("epochs, lr and lora_plus_ratio must be > 0")


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB), or CUDA's peak allocation when on GPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (inject an adapter and set it active)")
    # LoRA+ as PEFT's create_loraplus_optimizer: B factors and 1-D parameters (biases, norms of
    # saved modules) at lr x ratio, the rest at lr (PEFT's separate lr for embedding adapters is not copied)
    in_b = lambda n, p: ".lora_B." in n or ".lora_embedding_B." in n or p.dim() == 1  # noqa: E731
    b = [p for n, p in named if in_b(n, p)]
    rest = [p for n, p in named if not in_b(n, p)]
    groups = [{"params": rest, "lr": cfg.lr, "base_lr": cfg.lr}]
    if b:
        lr_b = cfg.lr * cfg.lora_plus_ratio
        groups.append({"params": b, "lr": lr_b, "base_lr": lr_b})
    return groups


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    warm = int(round(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else max(0.0, 1 - progress)


def _order(n: int, epoch: int, seed: int) -> list[int]:
    """The data order of ``epoch``: a function of (seed, epoch) only, so resuming needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# -- checkpoints (safetensors + JSON; nothing is ever unpickled) ----------------------------------
def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states (CPU, and CUDA when training there), gathered on every rank."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, t in mine.items():
        for r, state in enumerate(D.gather(t)):
            out[f"rng.{kind}" + (f".rank{r}" if r else "")] = state
    return out


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict,
                     device: torch.device) -> None:
    """Write the checkpoint atomically (rank 0; every rank must call it, to gather the RNG states)."""
    rng = _rng_states(device)
    tensors = {f"model.{n}": D.full_tensor(p.detach()).contiguous().cpu()
               for n, p in model.named_parameters() if p.requires_grad}
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = D.full_tensor(v if torch.is_tensor(v) else torch.tensor(v)).cpu()
    tensors.update(rng)
    if not D.is_main():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    py_rng = random.getstate()
    meta = {**state, "param_groups": groups, "python_rng": [py_rng[0], list(py_rng[1]), py_rng[2]],
            "world_size": D.world_size(), "param_names": _optimizer_names(model, opt)}
    (tmp / "state.json").write_text(json.dumps(meta))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # killed between the two renames
    return path


def load_checkpoint_weights(path: str | Path, model: nn.Module) -> tuple[dict, dict]:
    """Copy a checkpoint's trained parameters into ``model``; returns (its JSON state, all its tensors).

    The file is read onto the CPU and each tensor copied into its parameter, which converts it to
    the parameter's device and dtype."""
    path = _checkpoint_dir(path)
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith("model."):
                p = params[key[len("model."):]]
                p.copy_(D.like_param(t, p))  # a sharded parameter takes its shard
    return meta, tensors


def _optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The parameters' names in the optimizer's numbering (its state is stored by that number)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> dict:
    saved_names = json.loads((_checkpoint_dir(path) / "state.json").read_text()).get("param_names")
    if saved_names is not None and saved_names != _optimizer_names(model, opt):  # checked before anything is loaded
        raise LoraError(f"{path}: the checkpoint's optimizer state is numbered for other parameters or another "
                        "order (another lorakit version or settings); resuming would give each parameter another's "
                        "moments: start again without --resume, or with the settings that wrote it")
    meta, tensors = load_checkpoint_weights(path, model)
    meta.pop("param_names", None)
    state: dict = {}
    params = [p for g in opt.param_groups for p in g["params"]]  # the optimizer's numbering
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            p = params[int(idx)] if int(idx) < len(params) else None
            if p is None or (t.dim() and t.shape != p.shape):  # a DTensor's shape is the whole one
                # a checkpoint without names (older lorakit): at least each moment must fit its parameter
                raise LoraError(f"{path}: the checkpoint's optimizer state does not fit this model's parameters "
                                "(written by another lorakit version or settings); start again without --resume")
            state.setdefault(int(idx), {})[name] = D.like_param(t, p) if t.dim() else t
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})  # moves state to the params
    suffix = f".rank{D.rank()}" if D.rank() else ""
    if f"rng.torch{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        if device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], device)
    else:  # a rank the saving run did not have: a fresh stream of its own (only dropout draws from it)
        torch.manual_seed(_rank_seed(meta["config"]["seed"]) + meta["step"])
    v, internal, gauss = meta.pop("python_rng")
    random.setstate((v, tuple(internal), gauss))
    return meta


def _rank_seed(seed: int) -> int:
    """The torch seed of this rank: ``seed`` on rank 0 (the single-process run), distinct on others."""
    return seed + 7919 * D.rank()


# -- the loop -------------------------------------------------------------------------------------
def fit(model: nn.Module, train: Sequence, *, collate: Callable[[list], dict],
        loss_fn: Callable[[nn.Module, dict], torch.Tensor], cfg: TrainConfig = TrainConfig(),
        evaluate: Callable[[nn.Module], dict] | None = None, metric: str = "loss", higher_is_better: bool = False,
        out_dir: str | Path | None = None, resume: bool = False,
        on_best: Callable[[nn.Module, Path], None] | None = None, progress: bool = True,
        device: torch.device | str | None = None) -> list[dict]:
    """Train ``model``'s trainable parameters on ``train``; returns the metric records.

    Args:
        train: the examples; ``collate(list_of_examples)`` makes a batch (a dict of tensors).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss to minimise.
        evaluate: called after each epoch (or every ``cfg.eval_every`` steps); returns metrics,
            among them ``metric``. The best value so far triggers ``on_best(model, out_dir/"best")``.
        out_dir: where ``metrics.jsonl`` and ``checkpoint/`` go (nothing is written if None).
        resume: continue from ``out_dir/checkpoint`` if there is one.
        device: where batches go (default: the device of the model's first parameter); the model
            must already be there.

    Under torchrun, every rank calls ``fit`` with the same arguments; ``evaluate`` runs on every
    rank (it may compute on its own share and reduce, see :func:`lorakit.distributed.shard`), and so
    does ``on_best`` (which should write files on rank 0 only: :func:`lorakit.distributed.is_main`).
    The trainable parameters start as rank 0's (broadcast), as in ``DistributedDataParallel``.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    torch.manual_seed(_rank_seed(cfg.seed))
    random.seed(cfg.seed)
    main = D.is_main()
    out = Path(out_dir) if out_dir is not None else None
    if cfg.grad_checkpointing:
        _enable_checkpointing(model)
    sharded = D.is_sharded(model)  # FSDP2: every forward is a collective
    fsdp_grads = D.is_sharded(model, trainable=True)  # FSDP reduce-scatters them (sharded adapters)
    if sharded:  # before the optimizer takes the parameters: not the ones gathered by an evaluation before fit
        D.reshard(model)
    groups = _param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(train) / (cfg.batch_size * cfg.grad_accum))
    total = max(1, int(math.ceil(per_epoch * cfg.epochs)))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or per_epoch
    save_every = cfg.save_every or eval_every
    step, best, records = 0, None, []
    params = [p for g in opt.param_groups for p in g["params"]]
    ckpt = out / "checkpoint" if out else None
    if resume and ckpt and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        meta = _load_checkpoint(ckpt, model, opt, dev)
        step, best = meta["step"], meta["best"]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["step"] <= step] if (out / "metrics.jsonl").exists() else []
        saved_world = meta.get("world_size", 1)
        if saved_world != D.world_size() and main:
            print(f"lorakit: resuming a run of {saved_world} process(es) with {D.world_size()}: the data order, "
                  "batches and optimizer state continue as saved (the batch is global); dropout draws new "
                  "random numbers", file=sys.stderr)
    if not fsdp_grads:
        D.broadcast_from_main(params)  # every rank starts from rank 0's adapters (a no-op in one process)
    D.barrier()  # every rank has read the checkpoint and metrics before rank 0 rewrites them
    if out and main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bar = _progress(total, step, progress and main, cfg.log_every)
    micro = cfg.batch_size
    model.train()
    t0, seen, running = time.perf_counter(), 0, []
    while step < total:
        epoch, within = divmod(step, per_epoch)
        order = _order(len(train), epoch, cfg.seed)
        start = within * micro * cfg.grad_accum
        chunk = order[start:start + micro * cfg.grad_accum]
        for g, base_lr in zip(opt.param_groups, [g["base_lr"] for g in opt.param_groups]):
            g["lr"] = base_lr * _lr_factor(step, total, cfg)
        opt.zero_grad(set_to_none=True)
        n_micro = math.ceil(len(chunk) / micro)
        loss_sum = 0.0
        for i in range(n_micro):
            part = chunk[i * micro:(i + 1) * micro]
            mine = D.shard(part)  # all of it in a single process
            weight = len(mine) / len(part)  # this rank's share of the micro-batch's mean
            if not mine:
                if not sharded:
                    continue
                mine = part[:1]  # FSDP: every rank runs every forward/backward (collectives), this one weighs 0
            batch = _to_device(collate([train[j] for j in mine]), dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(model, batch)
            if weight != 1:
                loss = loss * weight
            loss = loss / n_micro
            (loss * D.world_size() if fsdp_grads else loss).backward()  # FSDP averages the ranks' gradients
            loss_sum += loss.item()
        if D.world_size() > 1:
            if not fsdp_grads:
                D.all_reduce_grads(params)
            loss_sum = D.reduce_sums([loss_sum])[0]
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # DTensor grads: the norm over all shards
        opt.step()
        step += 1
        seen += len(chunk)
        running.append(loss_sum)
        rate = seen / (time.perf_counter() - t0)  # examples/s of the whole job
        bar.step(step, loss_sum, opt.param_groups[0]["lr"], rate)
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "epoch": round(step / per_epoch, 3), "split": "train",
                   "loss": sum(running) / len(running), "lr": opt.param_groups[0]["lr"], "examples_per_s": rate}
            running = []
            _record(records, rec, out)
        if evaluate and (step % eval_every == 0 or step == total):
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            if sharded:
                D.reshard(model)
            model.train()
            rec = {"step": step, "epoch": round(step / per_epoch, 3), "split": "val", **metrics}
            value = metrics[metric]
            if best is None or (value > best if higher_is_better else value < best):
                best = value
                if out and on_best:
                    on_best(model, out / "best")
            _record(records, rec, out)
            if main:
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if ckpt and (step % save_every == 0 or step == total):
            _save_checkpoint(ckpt, model, opt, {"step": step, "best": best, "config": asdict(cfg)}, dev)
    bar.close()
    model.eval()
    return records


def _record(records: list, rec: dict, out: Path | None) -> None:
    records.append(rec)
    if out and D.is_main():
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_device(batch, device: torch.device):
    """``batch`` (a tensor, or a dict / list / tuple of them) on ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing of every block, non-reentrant: the adapters inside a
    block get their gradients though its (frozen) input does not require one."""
    root = unwrap(model)
    enable = getattr(root, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(root, "gradient_checkpointing_enable"):
        root.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError("gradient checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _say(stream, text: str) -> None:
    """One whole line on ``stream``: the other standard stream is flushed first, so that when both go to
    one file (``> log 2>&1``, nohup) no line of one lands inside a line of the other."""
    other = sys.stdout if stream is sys.stderr else sys.stderr
    other.flush()
    print(text, file=stream, flush=True)


class _Bar:
    """A carriage-return progress bar (tqdm, on stderr) for a terminal; ``write`` prints a line above it."""

    def __init__(self, tqdm, total: int, initial: int):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.1f}", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)  # clears the bar, prints the line, redraws the bar

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """Progress as whole lines, for a log file or pipe (stderr is not a terminal, where a carriage-return
    bar would leave every redraw in the file and other lines inside it): every ``every`` steps and at
    the last, ``step 20/200 (10%): loss 0.6931, lr 1.00e-03, 51.2 ex/s, 0:00:12 elapsed, ~0:01:48 left``
    on stderr (``every=0``: none); ``write`` prints a line on stdout."""

    def __init__(self, total: int, initial: int, every: int):
        self.total, self.initial, self.every = total, initial, every
        self.t0, self.losses = time.perf_counter(), []

    def step(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.losses.append(loss)
        if not self.every or (step % self.every and step != self.total):
            return
        spent = time.perf_counter() - self.t0
        left = spent / (step - self.initial) * (self.total - step)
        _say(sys.stderr, f"step {step}/{self.total} ({100 * step / self.total:.0f}%): loss "
                         f"{sum(self.losses) / len(self.losses):.4f}, lr {lr:.2e}, {rate:.1f} ex/s, "
                         f"{_clock(spent)} elapsed, ~{_clock(left)} left")
        self.losses = []

    def write(self, text: str) -> None:
        _say(sys.stdout, text)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _progress(total: int, initial: int, enabled: bool, every: int = 10):
    """A tqdm bar where stderr is a terminal; else (a log file, a pipe, no tqdm) a line every ``every``
    steps (:class:`_Lines`); not ``enabled``: no progress at all, only the lines ``write`` prints."""
    if not enabled:
        return _Lines(total, initial, 0)
    if _is_terminal(sys.stderr):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            pass
        else:
            return _Bar(tqdm, total, initial)
    return _Lines(total, initial, every)
