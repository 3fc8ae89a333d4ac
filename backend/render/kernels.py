"""Whether nerfacc's CUDA kernels can run here, probed once per process.

nerfacc 0.5 compiles its CUDA kernels on first use (JIT, through torch's cpp_extension), which
needs nvcc, ninja and a CUDA_HOME that match torch's CUDA. Without them the first call of an
occupancy-grid render dies deep inside nerfacc (``AttributeError`` on a ``None`` module, or an
``OSError`` from the compiler). :func:`nerfacc_cuda_status` tries the import once and says why
it failed, so the renderer can fall back to the batched path with one clear warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import Optional

log = logging.getLogger(__name__)

_lock = threading.Lock()
_status: Optional[tuple[bool, str]] = None


def _probe() -> tuple[bool, str]:
    missing = [tool for tool in ("nvcc", "ninja") if shutil.which(tool) is None]
    try:
        from nerfacc.cuda._backend import _C  # compiles the kernels the first time (minutes)
    except Exception as exc:  # noqa: BLE001 - any failure to build or load means "not available"
        return False, f"nerfacc's CUDA kernels failed to load ({type(exc).__name__}: {exc})" + _hint(missing)
    if _C is None:
        return False, "nerfacc's CUDA kernels are not built and cannot be compiled here" + _hint(missing)
    return True, "nerfacc CUDA kernels loaded"


def _hint(missing: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{' and '.join(missing)} not found on PATH")
    if not os.environ.get("CUDA_HOME"):
        parts.append("CUDA_HOME is not set")
    need = "; ".join(parts) or "check that nvcc's CUDA version matches torch's"
    return (f" ({need}). They compile on first use and need the CUDA toolkit (nvcc), ninja (pip install ninja) "
            "and CUDA_HOME; or install a prebuilt nerfacc wheel for your torch and CUDA versions.")


def nerfacc_cuda_status() -> tuple[bool, str]:
    """``(available, reason)``; the probe runs once per process."""
    global _status
    with _lock:
        if _status is None:
            _status = _probe()
            if not _status[0]:
                log.warning("%s; rendering with the batched (stratified) path instead of the occupancy grid", _status[1])
        return _status


def reset_probe() -> None:
    """Forget the probe's answer (tests)."""
    global _status
    with _lock:
        _status = None
