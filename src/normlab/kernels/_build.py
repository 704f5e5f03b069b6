"""Compile normlab's C++ kernels at first use and load them with ctypes.

The kernels are plain C++ with a C ABI (``csrc/norm_kernels.cpp``: batch norm;
``csrc/online_kernels.cpp``: Online Norm; ``csrc/group_kernels.cpp``: group and layer
norm; compiled together into one library): no
torch headers, so a build takes seconds, not the minutes of a
``torch.utils.cpp_extension`` build (measured on the 2-core development machine: 5 s
of CPU against 25 s, and 18 s against 105 s of wall time while loaded). The shared
library is cached under ``$NORMLAB_KERNEL_DIR`` or ``~/.cache/normlab/kernels``, in a
folder named by a hash of the sources, the compiler, its flags and the machine, so a
changed source or another CPU builds afresh and concurrent first uses do not clash
(the library is written to a temporary name and renamed into place).

Needs a C++ compiler with OpenMP (``$CXX``, else ``c++`` or ``g++``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["load_library", "available", "KernelBuildError", "cache_dir"]

SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("norm_kernels.cpp", "online_kernels.cpp", "group_kernels.cpp")]
# Included by the sources; part of the cache key, so a changed header rebuilds.
HEADERS = [Path(__file__).with_name("csrc") / "common.h"]
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
_ABI_VERSION = 1

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: Exception | None = None


class KernelBuildError(RuntimeError):
    """The fused kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$NORMLAB_KERNEL_DIR`` overrides)."""
    env = os.environ.get("NORMLAB_KERNEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab" / "kernels"


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise KernelBuildError(
        "normlab.kernels: no C++ compiler found (set CXX, or install g++); the fused fast "
        "paths need one, the default paths do not"
    )


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _build(target: Path, cxx: str, native: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    flags = _FLAGS + (["-march=native"] if native else [])
    cmd = [cxx, *flags, *map(str, SOURCES), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(
            f"normlab.kernels: compiling {', '.join(s.name for s in SOURCES)} failed "
            f"({' '.join(cmd)}):\n"
            f"{proc.stderr[-4000:]}"
        )
    os.replace(tmp, target)


def _load() -> ctypes.CDLL:
    source = b"\0".join(s.read_bytes() for s in SOURCES + HEADERS)
    cxx = _compiler()
    last: Exception | None = None
    for native in (True, False):
        key = hashlib.sha256(
            b"\0".join([source, _compiler_id(cxx).encode(), " ".join(_FLAGS).encode(),
                        str(native).encode(), platform.machine().encode(),
                        platform.processor().encode(), _cpu_model().encode()])
        ).hexdigest()[:16]
        target = cache_dir() / key / "libnormlab_kernels.so"
        try:
            if not target.exists():
                _build(target, cxx, native)
            lib = ctypes.CDLL(str(target))
            if lib.normlab_abi_version() != _ABI_VERSION:
                raise KernelBuildError(f"normlab.kernels: {target} has a different ABI version")
            return _declare(lib)
        except (KernelBuildError, OSError) as e:
            last = e
    raise KernelBuildError(str(last)) from last


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return ""


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f64, f32 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double,
                             ctypes.c_float)
    lib.normlab_bn_fwd.argtypes = [p, p, i32, i32, i64, i64, i64, p, p, f64, i32, f32, p, p, p,
                                   i32]
    lib.normlab_bn_fwd.restype = i32
    lib.normlab_bn_bwd.argtypes = [p, p, p, i32, i32, i64, i64, i64, p, p, p, p, i32, f32, i32,
                                   p, p, i32]
    lib.normlab_bn_bwd.restype = i32
    lib.normlab_online_fwd.argtypes = [p, p, i32, i64, i64, i64, p, p, f64, f64, i32, f64, p, p,
                                       p, p, i32]
    lib.normlab_online_fwd.restype = i32
    lib.normlab_online_bwd.argtypes = [p, p, p, i32, i64, i64, i64, p, p, f64, i32, p, p, p, p,
                                       p, p, i32]
    lib.normlab_online_bwd.restype = i32
    lib.normlab_gn_fwd.argtypes = [p, p, i32, i32, i64, i64, i64, i64, p, p, f64, p, p, i32]
    lib.normlab_gn_fwd.restype = i32
    lib.normlab_gn_bwd.argtypes = [p, p, p, i32, i32, i64, i64, i64, i64, p, p, p, p, p, i32]
    lib.normlab_gn_bwd.restype = i32
    return lib


def load_library() -> ctypes.CDLL:
    """The loaded kernel library, compiling it first if needed (once per process).

    Raises:
        KernelBuildError: no compiler, or the build failed (the message has the
            compiler's output).
    """
    global _lib, _error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            if _error is not None:
                raise KernelBuildError(str(_error)) from _error
            try:
                _lib = _load()
            except KernelBuildError as e:
                _error = e
                raise
    return _lib


def available() -> bool:
    """True if the kernels are compiled (or can be, now) and load."""
    try:
        load_library()
        return True
    except KernelBuildError:
        return False
