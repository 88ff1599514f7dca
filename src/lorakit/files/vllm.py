"""Export a PEFT-format adapter folder as one that vLLM serves unchanged and that computes the same update.

The rules come from vLLM's own loader (vllm-project/vllm, main branch as of 2025; read, not copied):

* ``vllm/lora/peft_helper.py``, ``PEFTHelper``: ``from_dict`` requires ``r``, ``lora_alpha`` and
  ``target_modules`` and drops every field it does not define, so ``rank_pattern``,
  ``alpha_pattern``, ``layers_to_transform`` and ``layers_pattern`` are ignored; ``__post_init__``
  computes ONE scaling for the whole adapter, ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
  ``use_rslora``); ``_validate_features`` and ``validate_legal`` refuse ``modules_to_save``,
  ``use_dora``, ``bias != "none"`` and ``r > max_lora_rank``.
* ``vllm/lora/utils.py``, ``parse_fine_tuned_lora_name``: a tensor is
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` or ``<module>.lora_embedding_A`` /
  ``lora_embedding_B``; any other name (``lora_B.bias``, ``lora_magnitude_vector``, trainable-token
  deltas, ``modules_to_save`` copies) is an "unsupported LoRA weight". ``is_base_embedding_weights``:
  ``*.embed_tokens.base_layer.weight`` / ``*.lm_head.base_layer.weight`` are skipped (vLLM keeps its
  model's own embeddings). ``get_supported_lora_modules``: every linear layer, plus the model's
  ``embedding_modules``.
* ``vllm/lora/lora_model.py``, ``LoRAModel.from_local_checkpoint``: the safetensors keys, not
  ``target_modules``, decide which modules are adapted; ``check_unexpected_modules`` refuses a
  module whose last name is not LoRA-capable and skips every key containing ``base_layer``;
  ``from_lora_tensors`` takes a module's factors as stored (its rank is their shape) and the scaling
  from ``PEFTHelper``. The LoRA layers' ``set_lora`` (``vllm/lora/layers/``) copy a factor of rank
  k into the first k of ``max_lora_rank`` slots, so modules of different ranks are served as they are.

So :func:`export_vllm` writes each module's own scale s (α_m/r_m, or α_m/√r_m) into its B, and
``r = lora_alpha = R`` (R: the largest rank), ``use_rslora: false``: vLLM's one scaling is then 1,
exactly. For PEFT and lorakit, which do read the patterns, a module of rank r_m ≠ R gets
``rank_pattern`` and ``alpha_pattern`` entries equal to r_m (scale 1 there too), keyed by its
escaped full path; ``target_modules`` lists the adapted modules' full paths (``layers_to_transform``
folded in). What vLLM cannot serve is refused with the reason, before anything is written; the
output folder appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ..config import LoraError
from .format import CONFIG_NAME, META_KEY, PEFT_FIELDS, PREFIX, QUANT_KEY, REFUSED, TOKENS_SUFFIX, WEIGHTS_NAME, read_adapter
from .writer import write_atomic

__all__ = ["export_vllm", "VllmExport", "VLLM_DEFAULT_MAX_LORA_RANK"]

#: vLLM's default ``--max-lora-rank`` (``LoRAConfig.max_lora_rank``).
VLLM_DEFAULT_MAX_LORA_RANK = 16
_FACTORS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
_SEE = "vLLM's LoRA loader (vllm/lora/peft_helper.py PEFTHelper, vllm/lora/utils.py parse_fine_tuned_lora_name)"


@dataclasses.dataclass(frozen=True)
class VllmExport:
    """What :func:`export_vllm` wrote.

    ``out_dir``: the new folder; ``r``: its ``r`` and ``lora_alpha`` (the largest module rank);
    ``ranks``: each module's rank; ``scales``: the scale s folded into each module's B;
    ``truncated``: for modules cut to ``max_lora_rank``, the relative Frobenius error of the cut,
    ‖ΔW − ΔW_k‖ / ‖ΔW‖; ``warnings``: what vLLM will do differently from the trained adapter."""

    out_dir: Path
    r: int
    ranks: dict[str, int]
    scales: dict[str, float]
    truncated: dict[str, float]
    warnings: tuple[str, ...]

    def __str__(self) -> str:
        low, high = min(self.ranks.values()), max(self.ranks.values())
        line = (f"exported {len(self.ranks)} modules for vLLM (r={low}" + (f"..{high}" if low != high else "")
                + f", one scaling: lora_alpha/r = {self.r}/{self.r}) to {self.out_dir}")
        if self.truncated:
            line += (f"; {len(self.truncated)} truncated to rank {self.r}, largest relative error "
                     f"{max(self.truncated.values()):.3e}")
        return line


def export_vllm(in_dir: str | os.PathLike, out_dir: str | os.PathLike,
                max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK, truncate: bool = False) -> VllmExport:
    """Write a copy of the adapter folder ``in_dir`` to ``out_dir`` that vLLM loads unchanged and that
    computes the same update (see the module doc for vLLM's rules and how they are met).

    Args:
        in_dir: a PEFT-format adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        out_dir: the folder to create; it must not exist, or be empty.
        max_lora_rank: the ``--max-lora-rank`` of the vLLM server (vLLM's default: 16); a module of
            higher rank is refused, unless ``truncate``.
        truncate: cut such modules to rank ``max_lora_rank`` by truncated SVD of their ΔW (the best
            approximation of that rank); the relative error of each is in the result.

    Returns:
        A :class:`VllmExport` (its ``str`` is a one-line summary).

    Raises:
        LoraError: the adapter cannot be served by vLLM as trained (DoRA, ``modules_to_save``,
            ``lora_bias``, trainable tokens, ``target_parameters``, a PiSSA/OLoRA file saved without
            conversion, convolution or ``nn.MultiheadAttention`` layers, base weights in the file, a
            rank above ``max_lora_rank``), or ``out_dir`` is taken; nothing is written then.
    """
    if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
        raise LoraError(f"max_lora_rank must be an integer >= 1 (vLLM's --max-lora-rank), got {max_lora_rank!r}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_out(in_dir, out_dir)
    file = read_adapter(in_dir)
    _check_config(file.lora, file.config, in_dir)
    factors, dropped = _factors(file.tensors, in_dir)
    notes = []
    if dropped:
        notes.append(f"{in_dir}: the file holds base weights {dropped}; vLLM skips them and serves with its "
                     "model's own (they equal the base unless the embeddings were changed), so they are left out")
    quant = json.loads(file.metadata.get(QUANT_KEY) or "{}")
    if quant:
        notes.append(f"{in_dir}: trained on a base quantized as {sorted(set(quant.values()))} ({len(quant)} layers); "
                     "vLLM applies the adapter to the base at vLLM's own precision, so outputs differ from those "
                     "of training by the base's quantization error")
    tensors, ranks, scales, truncated = {}, {}, {}, {}
    for path, (a_key, b_key) in sorted(factors.items()):
        a, b = file.tensors[a_key], file.tensors[b_key]
        rank = a.shape[0]
        if b.shape[1] != rank or rank != file.lora.rank_for(path):
            raise LoraError(f"{in_dir}: {path}: lora_A has rank {rank}, lora_B {b.shape[1]}, the config "
                            f"{file.lora.rank_for(path)}; the file is inconsistent (re-save it)")
        s = file.lora.scale_for(path)
        if rank > max_lora_rank:
            if not truncate:
                raise LoraError(f"{in_dir}: {path} has rank {rank} > max_lora_rank {max_lora_rank} (vLLM's "
                                "PEFTHelper.validate_legal refuses r > --max-lora-rank); start vLLM with a larger "
                                "--max-lora-rank and export with it, or truncate=True (--truncate) to cut every "
                                "such module to that rank by SVD (the error is reported)")
            a, b, truncated[path] = _truncated(a, b, s, max_lora_rank)
            rank, scaled_b = max_lora_rank, b
        else:
            scaled_b = (b.double() * s).to(b.dtype)
        tensors[a_key], tensors[b_key] = a.contiguous(), scaled_b.contiguous()
        ranks[path], scales[path] = rank, s
    top = max(ranks.values())
    config = _vllm_config(file.config, ranks, top)
    text = json.dumps(config, indent=2, sort_keys=True)
    metadata = {"format": "pt", META_KEY: text, **({QUANT_KEY: file.metadata[QUANT_KEY]} if quant else {})}
    weights = st_save(tensors, metadata=metadata)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    _write_folder(in_dir, out_dir, text.encode(), weights)
    return VllmExport(out_dir, top, ranks, scales, truncated, tuple(notes))


def _check_out(in_dir: Path, out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LoraError(f"{out_dir}: already exists and is not an empty folder; export writes a new folder "
                        "(delete it, or choose another)")
    if in_dir.resolve() == out_dir.resolve():
        raise LoraError(f"{out_dir}: is the input folder; export writes a new folder")


def _check_config(lora, config: dict, source: Path) -> None:
    """Refuse what vLLM's loader cannot serve as trained, naming the rule (``bias`` other than "none" is
    refused already by :func:`read_adapter`, as vLLM's ``validate_legal`` does)."""
    def no(what: str, why: str, fix: str) -> LoraError:
        return LoraError(f"{source}: {what}: vLLM cannot serve it ({why}); {fix}")
    if lora.use_dora:
        raise no("use_dora=True (DoRA)", "PEFTHelper._validate_features: 'vLLM does not yet support DoRA'",
                 "merge it into the base model instead (lorakit.merge_and_unload) and serve that")
    if lora.modules_to_save:
        raise no(f"modules_to_save={list(lora.modules_to_save)}", "PEFTHelper._validate_features: 'vLLM only "
                 "supports modules_to_save being None'", "merge the adapter and serve the merged model, or "
                 "retrain without modules_to_save")
    if lora.lora_bias:
        raise no("lora_bias=True (a bias on lora_B)", "parse_fine_tuned_lora_name accepts only lora_A/lora_B "
                 "weights and lora_embedding_A/B; vLLM removed LoRA biases", "retrain with lora_bias=False")
    if lora.trainable_token_indices is not None:
        raise no(f"trainable_token_indices={config.get('trainable_token_indices')!r}", "their "
                 "token_adapter.trainable_tokens_delta tensors are not LoRA weights to parse_fine_tuned_lora_name",
                 "merge the adapter and serve the merged model")
    if lora.target_parameters:
        raise no(f"target_parameters={list(lora.target_parameters)}", "vLLM adapts modules (linear layers and "
                 "embeddings), not raw parameters", "target the modules instead")
    if lora.init in ("pissa", "olora"):
        raise no(f"init_lora_weights={lora.init!r} saved without conversion", "the update is relative to a "
                 "base rewritten from the SVD/QR of W, which vLLM's base model is not, and the file alone cannot "
                 "undo it", "save it converted to plain LoRA: lorakit.save(model, dir, convert_to_lora=True) "
                 "(PEFT: path_initial_model_for_weight_conversion), then export that")


def _factors(tensors: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{module path: (A key, B key)}``, and the base-weight keys vLLM skips (left out); any other key
    is refused with what it is."""
    found: dict[str, dict[str, str]] = {}
    rest = []
    for key, t in tensors.items():
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            rest.append(key)
            continue
        path = key[len(PREFIX):-len(suffix)]
        if ".base_layer." in f".{path}.":
            raise LoraError(f"{source}: {key} is a part of an nn.MultiheadAttention (PEFT names it through "
                            "base_layer): vLLM has LoRA for linear layers and embeddings only, and its "
                            "check_unexpected_modules skips keys containing 'base_layer', so it would be silently "
                            "unadapted; such adapters cannot be exported")
        if t.dim() != 2:
            raise LoraError(f"{source}: {key} has shape {tuple(t.shape)}: a convolution's LoRA; vLLM has LoRA for "
                            "linear layers and embeddings only (vllm/lora/utils.py get_supported_lora_modules)")
        found.setdefault(path, {})[_FACTORS[suffix]] = key
    adapted = set(found)
    dropped = []
    for key in rest:
        owner = key[len(PREFIX):].split(".base_layer.", 1)[0] if key.startswith(PREFIX) else None
        if owner in adapted and key.startswith(f"{PREFIX}{owner}.base_layer."):
            dropped.append(key)  # a LoRA-adapted embedding's own weight (PEFT's save_embedding_layers)
            continue
        raise LoraError(f"{source}: {key} is {_what(key)}; vLLM accepts only lora_A/lora_B weights and "
                        f"lora_embedding_A/B ({_SEE}), so it cannot serve this adapter as trained")
    for path, keys in found.items():
        if len(keys) != 2:
            raise LoraError(f"{source}: {path} has only lora_{next(iter(keys))}; every module needs A and B")
    if not found:
        raise LoraError(f"{source}: the file holds no LoRA factors (lora_A/lora_B); nothing vLLM could serve")
    return {p: (k["A"], k["B"]) for p, k in found.items()}, sorted(dropped)


def _what(key: str) -> str:
    if key.endswith(".lora_magnitude_vector"):
        return "a DoRA magnitude"
    if key.endswith(".lora_B.bias"):
        return "a lora_bias bias"
    if key.endswith(TOKENS_SUFFIX):
        return "a trainable-tokens delta"
    if ".modules_to_save." in key:
        return "a modules_to_save copy"
    if not key.startswith(PREFIX):
        return f"not under PEFT's prefix {PREFIX!r}"
    return "a base weight (PEFT's save_embedding_layers writes one for a resized vocabulary, which vLLM would not load)"


def _truncated(a: torch.Tensor, b: torch.Tensor, s: float, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-k factors (A_k, B_k, with s inside B_k) of ΔW = s·B·A, in float64 through the thin QR
    of B and Aᵀ (ΔW itself is never formed), and ‖ΔW − B_k·A_k‖ / ‖ΔW‖."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, sv, vh = torch.linalg.svd(s * rb @ ra.T)
    total = float(sv.square().sum())
    error = math.sqrt(float(sv[k:].square().sum()) / total) if total > 0 else 0.0
    root = sv[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root
    a_k = root[:, None] * (vh[:k] @ qa.T)
    return a_k.to(a.dtype), b_k.to(b.dtype), error


def _vllm_config(original: dict, ranks: dict[str, int], top: int) -> dict:
    """PEFT's config for the exported factors: scale 1 for vLLM (one global alpha/r) and for PEFT/lorakit
    (the patterns), the adapted modules by full path; the original's metadata fields kept."""
    kept = {k: v for k, v in original.items() if PEFT_FIELDS.get(k) == "metadata" and k != "inference_mode"}
    patterns = {re.escape(p): r for p, r in ranks.items() if r != top}
    return {**kept, "peft_type": "LORA", "r": top, "lora_alpha": top, "use_rslora": False,
            "lora_dropout": original.get("lora_dropout") or 0.0, "fan_in_fan_out": bool(original.get("fan_in_fan_out")),
            "target_modules": sorted(ranks), "rank_pattern": patterns, "alpha_pattern": dict(patterns),
            "init_lora_weights": True, "inference_mode": True, **REFUSED, "use_dora": False, "lora_bias": False,
            "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "target_parameters": None,
            "exclude_modules": None, "trainable_token_indices": None}


def _write_folder(in_dir: Path, out_dir: Path, config: bytes, weights: bytes) -> None:
    """Build the folder under a temporary name next to ``out_dir`` (the config, the weights, and the input's
    other plain files, e.g. lorakit_task.json), then rename it into place: complete or absent."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for item in sorted(in_dir.iterdir()):
            if item.is_file() and item.name != CONFIG_NAME and not item.name.startswith("adapter_model."):
                shutil.copyfile(item, tmp / item.name)
        write_atomic(tmp / CONFIG_NAME, config)
        write_atomic(tmp / WEIGHTS_NAME, weights)
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out_dir)  # replaces an empty out_dir; refuses (OSError) one that filled meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
