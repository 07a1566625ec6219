"""The C kernels of sae/csrc, compiled on first use by the system's C compiler and called through ctypes.

Why C and not a torch op: a harvest batch's top-k must read the 64 MB encoder product once and select as it
reads, and no torch op does that (see csrc/topk.c). Why not a torch C++ extension: it compiles torch's headers
for a minute and ties the build to one torch version; this file has no torch in it and builds in a second.

The build goes to a cache folder (SAE_KERNEL_DIR, else ~/.cache/interp/kernels), named by a hash of the source
and the flags, so an edit or a new machine rebuilds and concurrent builders cannot overwrite each other's half.
OpenMP comes from the libgomp that torch has loaded already (same soname), so the kernel's threads are torch's.
Where no compiler or no libgomp is found, the kernel is absent: a warning says so once, and callers take their
torch path, slower but the same answer.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

SRC = Path(__file__).with_name("csrc") / "topk.c"
log = logging.getLogger(__name__)


def _flags() -> list[str]:
    simd = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
    return ["-O3", "-shared", "-fPIC", "-fopenmp", *simd]


def _build(src: Path) -> Path:
    cc, flags = os.environ.get("CC", "cc"), _flags()
    tag = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("SAE_KERNEL_DIR", "~/.cache/interp/kernels")).expanduser()
    lib = folder / f"{src.stem}-{tag}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        part = lib.with_suffix(f".{os.getpid()}.part")
        subprocess.run([cc, *flags, str(src), "-o", str(part)], check=True, capture_output=True, text=True)
        os.replace(part, lib)
    return lib


@lru_cache(maxsize=None)
def _topk_lib():
    try:
        lib = ctypes.CDLL(str(_build(SRC)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        log.warning("sae.native: the C top-k could not be built (%s); using torch's, which is slower", detail)
        return None
    fn = lib.topk_rows_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    return _topk_lib() is not None


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices [N, k] of each row's k largest entries of x [N, n] (float32, CPU, contiguous, 0 < k <= n), in
    no order; None where the kernel cannot answer (not built here, or a row holds NaN or inf, which torch's
    top-k ranks its own way)."""
    fn = _topk_lib()
    if fn is None:
        return None
    N, n = x.shape
    out = torch.empty(N, k, dtype=torch.long)
    return None if fn(x.data_ptr(), N, n, k, out.data_ptr(), torch.get_num_threads()) else out
