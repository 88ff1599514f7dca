"""Devices and data-parallel training on ``torch.distributed`` (gloo on CPU, nccl on CUDA).

One process per device, started by ``torchrun`` (or ``lorakit train --nproc N``, which runs it):
torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, and :func:`setup` joins the process group.
Outside torchrun every function here is the single-process case (rank 0 of 1), so the training
loop has one code path.

Data parallelism is done by hand rather than by wrapping the model in ``DistributedDataParallel``:
only the adapters (and ``modules_to_save``) have gradients, so after the backward pass
:func:`all_reduce_grads` sums them in one flat buffer per dtype, one collective per step — the same
bytes DDP would send, the model object stays the user's (``save``, ``merge`` and ``evaluate`` see
no wrapper), and a rank whose share of a batch is empty still takes part.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import signal
import sys
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from .config import LoraError
from .sharding import full_tensor, is_main, is_sharded, like_param, rank, world_size
from .state import registry_of

__all__ = ["DEVICES", "RankFailure", "resolve_device", "setup", "teardown", "rank", "world_size", "is_main", "shard",
           "shard_batches",
           "all_reduce_grads", "broadcast_from_main", "reduce_sums",
           "ADAPTER_LAYOUTS", "fully_shard_model", "reshard", "is_sharded", "full_tensor", "like_param", "trainable_state",
           "gather", "barrier", "DEFAULT_TIMEOUT_S"]

DEVICES = ("auto", "cpu", "cuda", "mps")
#: Seconds a collective waits for the other ranks before the job stops (``init_process_group``'s timeout).
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A collective failed: another rank died (or did not answer within the timeout)."""


def _collective(what: str, fn, *args) -> None:
    """Run one collective; a failure becomes a :class:`RankFailure` with a message for the user."""
    try:
        fn(*args)
    except RuntimeError as e:  # gloo/nccl: "Connection closed by peer", timeouts (DistBackendError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankFailure(f"rank {rank()}/{world_size()}: lost contact with another rank during {what} "
                          f"({first[:200]}); the job stops. The failing rank's error is in its output; continue "
                          "from the last checkpoint with --resume.") from e


def _launched() -> bool:
    """True in a process started by torchrun (or anything else that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(spec: str = "auto") -> torch.device:
    """The ``torch.device`` for ``--device``: ``auto`` is CUDA, else MPS, else the CPU.

    Under torchrun, CUDA means this process's ``cuda:LOCAL_RANK``. Asking for a device that is not
    there raises a :class:`~lorakit.LoraError` naming what is available."""
    if spec not in DEVICES:
        raise LoraError(f"device {spec!r}: expected one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        spec = "cuda" if cuda else "mps" if mps else "cpu"
    if spec == "cuda":
        if not cuda:
            raise LoraError(f"device 'cuda': no CUDA device is available here (torch {torch.__version__}); "
                            f"use --device cpu{' or mps' if mps else ''}")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise LoraError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): start at "
                            "most one process per GPU (--nproc-per-node)")
        return torch.device("cuda", local)
    if spec == "mps":
        if not mps:
            raise LoraError("device 'mps': Apple's MPS backend is not available here; use --device cpu")
        if _launched() and int(os.environ["WORLD_SIZE"]) > 1:
            raise LoraError("device 'mps' supports one process only (torch.distributed has no MPS backend)")
        return torch.device("mps")
    return torch.device("cpu")


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join torchrun's process group (nccl for CUDA, gloo otherwise); nothing outside torchrun.

    A collective that waits longer than ``timeout_s`` for another rank raises, so a job whose rank
    died stops instead of hanging. Also installs a SIGTERM handler: torchrun ends the surviving
    ranks with SIGTERM when one fails, and each then exits with a one-line message."""
    if not _launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame) -> None:
    print(f"lorakit: rank {rank()}/{world_size()}: stopped by SIGTERM (another rank failed, or the job was "
          "stopped); its error is above. Continue from the last checkpoint with --resume.",
          file=sys.stderr, flush=True)
    sys.exit(143)


def teardown() -> None:
    """Leave the process group (if this process joined one); its threads have ended when this returns.

    ``destroy_process_group`` alone leaves a gloo group alive after FSDP2: each ``DeviceMesh`` holds its
    groups (and DTensor's caches keep the meshes for the whole process), each FSDP2 unit its mesh's group,
    and a sharded model can outlive its task (a traceback kept by a library holds its frame). The group's
    threads then ran on into interpreter exit, where its destruction during finalization now and then
    aborted a rank after its work was done ("terminate called without an active exception", SIGABRT). So
    the torch.distributed objects still alive forget the destroyed groups and the garbage is collected:
    the group is destroyed here and its threads joined. A sharded model cannot run after this."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    if "torch.distributed.device_mesh" in sys.modules:  # FSDP2 / DTensor kept references to the groups
        for obj in gc.get_objects():
            module = type(obj).__dict__.get("__module__")
            attrs = getattr(obj, "__dict__", None) if str(module).startswith("torch.distributed") else None
            for key, value in list(attrs.items()) if isinstance(attrs, dict) else ():
                if isinstance(value, dist.ProcessGroup):  # e.g. an FSDP2 unit's shard_process_group
                    attrs[key] = None
                elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
                    value.clear()  # e.g. a DeviceMesh's registry of its groups
    gc.collect()  # the groups' last references may sit in reference cycles (a sharded model's FSDP2 state)


def barrier() -> None:
    if dist.is_initialized():
        _collective("a barrier", dist.barrier)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items``: sizes differ by at most one, earlier ranks larger."""
    n, w, r = len(items), world_size(), rank()
    q, extra = divmod(n, w)
    start = r * q + min(r, extra)
    return items[start:start + q + (r < extra)]


def shard_batches(items: Sequence[T], size: int, pad: bool = False):
    """This rank's share of ``items`` (:func:`shard`) in batches of ``size``, as ``(batch, counted)`` pairs.

    ``pad`` (a sharded model, whose every forward is a collective): every rank yields as many
    batches as the largest share needs; a rank with fewer yields ``(items[:1], False)`` for the
    rest, to be run and not counted. Without ``pad`` every batch is counted."""
    mine = shard(items)
    n = math.ceil(math.ceil(len(items) / world_size()) / size) if pad else math.ceil(len(mine) / size)
    for i in range(n):
        batch = mine[i * size:(i + 1) * size]
        yield (batch, True) if batch else (items[:1], False)


def _comm_device() -> torch.device:
    """Where collective buffers live: nccl needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sums(values: Sequence[float]) -> list[float]:
    """Sum each number over all ranks (float64)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    _collective("a sum of metrics", dist.all_reduce, t)
    return t.tolist()


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks, in place (one flat buffer per dtype).

    A parameter without a gradient on this rank contributes zeros; one without a gradient on every
    rank keeps ``grad = None`` (as in a single process, so AdamW skips it)."""
    if not dist.is_initialized():
        return
    has = reduce_sums([p.grad is not None for p in params])
    buckets: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, count in zip(params, has):
        if count:
            buckets.setdefault(p.dtype, []).append(p)
    dev = _comm_device()
    for ps in buckets.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dev)
                          for p in ps])
        _collective("the gradient all-reduce", dist.all_reduce, flat)
        offset = 0
        for p in ps:
            g = flat[offset:offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def broadcast_from_main(params: Sequence[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values of ``params`` (one flat buffer per dtype)."""
    if not dist.is_initialized():
        return
    buckets: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        buckets.setdefault(p.dtype, []).append(p)
    dev = _comm_device()
    with torch.no_grad():
        for ps in buckets.values():
            flat = torch.cat([p.detach().reshape(-1).to(dev) for p in ps])
            _collective("the start-up broadcast", dist.broadcast, flat, 0)
            offset = 0
            for p in ps:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), on every rank, on ``t``'s device."""
    if not dist.is_initialized():
        return [t]
    dev = _comm_device()
    out = [torch.empty_like(t, device=dev) for _ in range(world_size())]
    _collective("a gather", dist.all_gather, out, t.to(dev))
    return [o.to(t.device) for o in out]


# -- FSDP2 ---------------------------------------------------------------------------------------------
ADAPTER_LAYOUTS = ("sharded", "replicated")


def fully_shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None,
                      adapters: str = "sharded") -> torch.nn.Module:
    """Shard ``model`` across the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place.

    Each block named by a transformers model's ``_no_split_modules`` becomes one FSDP unit, then
    the root; the frozen base weights are sharded on dim 0. ``adapters``: "sharded" shards the
    trainable parameters with their unit (FSDP reduce-scatters their gradients; it averages over
    the ranks, so :func:`lorakit.train.fit` scales each rank's loss by the world size, gloo having
    no pre-multiplied sum); "replicated" leaves them whole on every rank (FSDP's
    ``ignored_params``), and ``fit`` all-reduces their gradients as without FSDP. ``param_dtype``
    (e.g. bf16) is FSDP's mixed-precision compute dtype; gradients are reduced in fp32. Call after
    ``inject`` and before :func:`~lorakit.train.fit`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dora = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
    if dora:  # DoRA's ‖W + ΔW‖ reads the whole base weight: not checked on shards, so refused
        raise LoraError(f"DoRA adapters ({dora[0]}, ...) are not supported under FSDP2 (not tested on sharded "
                        "weights); train them with data parallelism (--nproc without --fsdp)")
    if not dist.is_initialized():
        raise LoraError("fully_shard_model needs torchrun's process group (call lorakit.distributed.setup first)")
    if adapters not in ADAPTER_LAYOUTS:
        raise LoraError(f"adapters={adapters!r}: expected one of {', '.join(ADAPTER_LAYOUTS)}")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    ignored = {p for p in model.parameters() if p.requires_grad} if adapters == "replicated" else None
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    # lorakit's registry remembers each base parameter (its requires_grad flag, restored on unload): point it
    # at the shards, or it would keep every rank's whole unsharded copy alive (measured: the whole model's bytes)
    reg = registry_of(model)
    if reg is not None:
        now = dict(model.named_parameters(remove_duplicate=False))
        reg.frozen = [(now[names[id(p)]], flag) for p, flag in reg.frozen if id(p) in names]
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of ``model``'s FSDP2 units (each rank keeps its shards); nothing otherwise.

    Needed after a forward without a backward (evaluation, generation): FSDP2 keeps the root's
    weights gathered after its forward for the backward that would follow, and a training forward
    that reuses weights gathered under ``no_grad`` leaves some parameters without gradients (seen
    here: a classifier head's stayed ``None``). :func:`lorakit.train.fit` calls this before
    training and after each evaluation."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model`` whole, by name, on every rank (a collective under FSDP2).

    FSDP2 keeps re-registering its sharded parameters on the modules, so a sharded model cannot be
    saved in place: load this state into an unsharded copy of the model (``load_state_dict(...,
    strict=False)``) on rank 0 and ``lorakit.save`` that (``tests/test_distributed.py`` does)."""
    return {n: full_tensor(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}
