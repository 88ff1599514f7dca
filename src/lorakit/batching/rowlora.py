"""The per-row LoRA kernel of :func:`lorakit.mixed` on CPU: ``torch.ops.lorakit.rowlora_``.

    y[i] += s[slot[i]] · B[slot[i]] · (A[slot[i]] · x[i])      for every token of row i (slot -1: nothing)

and ``torch.ops.lorakit.rowlora_lookup_`` for embeddings (x are token ids, A[s]·x is A[s]'s column).

It reads each row's factors from the adapters' own parameters, by index (the list of the adapters
the batch uses and one slot per row), so a mixed batch allocates nothing the size of its factors:
no per-row copies and no stacked bank. The op is C++ (``rowlora.cpp``, ATen threads over the
tokens, ordered by slot so that a thread reads a slot's factors once per run), registered with
``torch.library`` and compiled with the system's C++ compiler (``$CXX``, else ``c++``) at first use
into ``$LORAKIT_CACHE_DIR`` (default ``~/.cache/lorakit``), keyed by the source, torch's and
Python's versions and the CPU, so later processes only load it. Where Python's headers are
installed the same library is also a Python module whose ``rows_`` runs the op without the
dispatcher (which boxes every factor of the lists, ~0.4 µs each: 30 µs per layer and step with 64
adapters) and with the GIL released; :func:`add_rows_unchecked_` calls it.

If it cannot be built or loaded, :func:`available` warns once and returns False, and mixed batches
take the plain PyTorch path (gathered factors and ``bmm``), which is also the reference the tests
compare with. ``LORAKIT_ROWLORA=0`` in the environment, or :func:`use` ``(False)``, selects that
path without trying to build. The op has no autograd formula: it is used only with gradients off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..config import LoraError

__all__ = ["available", "use", "add_rows_", "add_rows_unchecked_", "build"]

_SOURCE = Path(__file__).with_name("rowlora.cpp")
_LOCK = threading.Lock()
_state: bool | None = None  # None: not tried yet in this process; True: loaded; False: failed (warned once)
_direct = None  # the library's Python binding, rows_(y, x, a, b, scale, slots, lookup), when it has one
_wanted = os.environ.get("LORAKIT_ROWLORA", "1") != "0"


def use(flag: bool) -> None:
    """Select the kernel (True, the default) or the plain PyTorch path (False) for later mixed batches
    (a routing already open keeps the path its layers planned)."""
    global _wanted
    _wanted = bool(flag)


def available() -> bool:
    """Whether mixed batches on CPU use the kernel: selected, and built and loaded (the first call
    builds it if needed, ~30 s; a failure warns once and leaves the PyTorch path)."""
    global _state, _direct
    if not _wanted:
        return False
    if _state is None:
        with _LOCK:
            if _state is None:
                try:
                    path = build()
                    if _python_headers() is not None:  # a Python module too: importing it registers the ops
                        spec = importlib.util.spec_from_file_location("_rowlora", path)
                        module = importlib.util.module_from_spec(spec)
                        spec.loader.exec_module(module)
                        _direct = module.rows_
                    elif not hasattr(torch.ops.lorakit, "rowlora_"):
                        torch.ops.load_library(str(path))
                    _state = True
                except Exception as e:  # noqa: BLE001 — any failure means: use the reference path
                    _state = False
                    warnings.warn(f"lorakit: the per-row LoRA kernel could not be built or loaded ({e}); mixed "
                                  "batches use the plain PyTorch path (same results, slower first steps)",
                                  RuntimeWarning, stacklevel=2)
    return _state


def _cpu() -> str:
    try:  # the flags line: a cached build with -march=native must not run on another CPU
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _python_headers() -> str | None:
    """The directory of Python.h, if this Python's headers are installed (for the binding)."""
    include = sysconfig.get_paths().get("include")
    return include if include and Path(include, "Python.h").is_file() else None


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile the kernel into the cache (if not there yet) and return the shared library's path: the
    torch.library ops, and the Python binding where Python's headers are installed.

    Raises RuntimeError with the compiler's output if compiling fails."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    headers = _python_headers()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *([f"-I{headers}"] if headers else ["-DLORAKIT_NO_BINDING"])]
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, torch.__version__.encode(), cxx.encode(), " ".join(flags).encode(),
                                     _cpu().encode(), sys.platform.encode(),
                                     sys.implementation.cache_tag.encode()])).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("LORAKIT_CACHE_DIR") or Path.home() / ".cache" / "lorakit")
    target = root / f"rowlora-{key}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    libs = cpp_extension.library_paths()
    cmd = [cxx, *flags, *(f"-I{p}" for p in cpp_extension.include_paths()), str(_SOURCE),
           *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu",
           *(["-ltorch_python"] if headers else [])]
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # built aside, then renamed: concurrent builds are safe
        out = Path(tmp) / target.name
        try:
            done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{cxx}: {e}") from None
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} exited with {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
        os.replace(out, target)
    return target


def add_rows_(y: Tensor, x: Tensor, a: Sequence[Tensor], b: Sequence[Tensor], scale: Sequence[float],
              slots: Tensor, lookup: bool = False) -> None:
    """``y[i, t] += scale[s]·B[s]·(A[s]·x[i, t])`` with ``s = slots[i]`` (-1: row i unchanged), in place.

    x (R, T, k) and y (R, T, d) with a unit last stride; A[s] (r_s, k), B[s] (d, r_s) contiguous;
    any floating dtypes (accumulated in float, or double if any is double; y rounded once).
    ``lookup``: embeddings, x are token ids (R, T) (int64 or int32) and A[s] is (r_s, num), so the
    update is ``scale[s]·B[s]·A[s][:, x[i, t]]``. Builds the kernel if needed (:func:`available`;
    LoraError if it is not available); refuses tensors that require gradients while gradients are on."""
    if not available():
        raise LoraError("lorakit's per-row LoRA kernel is not available here (LORAKIT_ROWLORA=0, use(False), or "
                        "it could not be built: see the warning); lorakit.mixed runs without it")
    if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or any(t.requires_grad for t in (*a, *b))):
        raise LoraError("lorakit's per-row LoRA kernel has no backward; run it under torch.no_grad() / "
                        "inference_mode (lorakit.mixed takes the differentiable path when gradients are on)")
    add_rows_unchecked_(y, x, list(a), list(b), [float(s) for s in scale], slots, lookup)


def add_rows_unchecked_(y: Tensor, x: Tensor, a: list[Tensor], b: list[Tensor], scale: list[float],
                        slots: Tensor, lookup: bool = False) -> None:
    """:func:`add_rows_` for a caller that made its checks already (gradients off, lists of factors and
    float scales prepared): :mod:`lorakit.batching.mixed`'s plans, which run once per layer per decode step.
    Through the Python binding when the library has one and no ``TorchDispatchMode`` is active (a mode
    sees the op only through ``torch.ops``), else through ``torch.ops``."""
    if _direct is not None and not torch._C._len_torch_dispatch_stack():
        _direct(y, x, a, b, scale, slots, lookup)
    else:
        (torch.ops.lorakit.rowlora_lookup_ if lookup else torch.ops.lorakit.rowlora_)(y, x, a, b, scale, slots)
