"""What describes this machine: the CPU's instruction set and the versions of the libraries in use.

Both go into cache keys and artifacts: an engine tuned for AMX or built against one onnxruntime must not
be reused on a CPU or with a library that differs.
"""
from __future__ import annotations

import os
import platform
import re
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

CORE_LIBRARIES = ("compilers", "torch", "onnx", "numpy")


@lru_cache(maxsize=1)
def cpu_isa() -> str:
    """`arch:flags`: the CPU's vector/matrix extensions (AVX-512, AMX, NEON, ...)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        flags = []
    keep = sorted(f for f in flags if re.match(r"(avx|amx|sse|fma|f16c|vnni|bf16|neon|sve)", f))
    return f"{platform.machine()}:{','.join(keep) or platform.processor()}"


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name and the cores this process may use, e.g. `Intel(R) Xeon(R) ... (2 cores)`."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        name = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name or platform.processor() or platform.machine()} ({cores} cores)"


def installed_versions(libraries: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each of `libraries` (distribution names); absent ones are left out."""
    found = {}
    for lib in libraries:
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return found


def own_version() -> str:
    """This package's installed version ("unknown" when run from a source tree that is not installed)."""
    try:
        return version("compilers")
    except PackageNotFoundError:
        return "unknown"


def library_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Python and the core libraries' versions, plus `extra` (a backend's own): how an artifact was made."""
    return {"python": platform.python_version(), **installed_versions(CORE_LIBRARIES), **(extra or {})}
