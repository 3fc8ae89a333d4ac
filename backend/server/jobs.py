"""The jobs folder: one directory per job with its state, config, checkpoint and results.

Layout of ``<jobs_dir>/<job_id>/``::

    job.json          state record (queued/running/done/failed/cancelled/interrupted) and the
                      job's configuration (its current nested form), atomic writes
    result.glb, texture.png, preview.png, summary.json   written by distill3d.job.generate
    mesh.npz          the exact wire arrays of the result (no pickle), for fast ``fetch``
    checkpoint/       the trainer's checkpoint (kept until the job is done)

Only the server's main loop mutates :class:`JobRecord` objects and writes ``job.json``;
worker threads write result files into the job folder, and fsync them and the folder,
before they report completion.

Storage faults (full disk, read-only folder, I/O errors) never escape as a bare ``OSError``:
every write here raises :class:`StorageError` (wire code ``storage``), whose message names
the file and the cause; :func:`storage_problem` tells whether an exception raised inside a
job (e.g. by the trainer's checkpoint, whose torch writer raises ``RuntimeError``) was one.

A record holds its job as a typed :class:`~distill3d.config.JobConfig`, validated once: at
submit, or when ``job.json`` is read (:func:`distill3d.config.parse_job` also reads the flat
form of older servers' files). A stored config that no longer parses keeps the record
listable; the job cannot run (``config_error`` says why) and its text is written back as read.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from distill3d_protocol import ARRAY_SLOTS, JOB_ID_RE, JOB_STATES
from distill3d_protocol.errors import Distill3DError

from ..config import ConfigError, JobConfig, parse_job
from ..texturing import INPUT_MESH_FILE

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
MESH_FILE = "mesh.npz"
CHECKPOINT_DIR = "checkpoint"
RESULT_FILES = ("result.glb", "texture.png", "preview.png", "summary.json", MESH_FILE)
RESUMABLE_STATES = ("interrupted", "cancelled", "failed")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")


class JobStoreError(Distill3DError, RuntimeError):
    """The jobs folder cannot be used (not writable, not a directory)."""


class StorageError(JobStoreError):
    """A file of the jobs folder could not be written or read; ``code`` is the wire's error code."""

    code = "storage"

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause


# errnos that mean the storage itself failed, whichever file it was
STORAGE_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EROFS, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e)
# torch's checkpoint writer reports OS failures as RuntimeError: "[enforce fail at inline_container.cc:...]"
_TORCH_WRITER = "inline_container.cc"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"[:500]


def _storage_error(what: str, path: Path, exc: BaseException) -> StorageError:
    return StorageError(f"cannot {what} {path}: {_describe(exc)}", exc)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):  # e.g. Windows: folders cannot be fsynced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_job_id() -> str:
    """Sortable by creation time, unguessable, and a safe folder name."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(6)


def json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy: numpy scalars to Python, non-finite floats to None, the rest to str."""
    if depth > 7:
        return str(value)[:200]
    if value is None or isinstance(value, (bool, str)):
        return value if not isinstance(value, str) else value[:4000]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, dict):
        return {str(k)[:256]: json_safe(v, depth + 1) for k, v in list(value.items())[:1000]}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in list(value)[:1000]]
    if isinstance(value, np.ndarray) and value.size <= 1000:
        return json_safe(value.tolist(), depth + 1)
    return str(value)[:4000]


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the folder: the old or the new file, never a torn one.
    Raises :class:`StorageError` (the temporary file is removed)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _remove_quietly(tmp)
        raise _storage_error("write", path, exc) from None


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass
class JobRecord:
    """What the server knows about one job (persisted as job.json)."""

    job_id: str
    config: Optional[JobConfig]  # None only when the stored config no longer parses (config_error)
    owner: str  # client name, or "peer:<routing id hex>" for anonymous clients
    state: str = "queued"
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    step: int = 0
    total: int = 0
    message: Optional[str] = None
    checkpoint_step: Optional[int] = None
    resume: bool = False  # the next run continues from the checkpoint
    files: List[str] = field(default_factory=list)
    # not persisted: why a stored config cannot run, and its JSON as read (written back unchanged)
    config_error: Optional[str] = field(default=None, repr=False, compare=False)
    stored_config: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)

    _TRANSIENT = ("config_error", "stored_config")

    def config_json(self) -> Dict[str, Any]:
        """The job's configuration as saved: the current nested form (or the unparsable text as read)."""
        return self.config.to_dict() if self.config is not None else dict(self.stored_config or {})

    def info(self, position: Optional[int] = None) -> Dict[str, Any]:
        """The protocol's job-info record."""
        if self.config is not None:
            prompt, method, prior = self.config.prompt, self.config.method.KIND, self.config.prior.KIND
        else:  # best effort from the stored text, of any version
            raw = self.stored_config or {}
            prompt, method, prior = raw.get("prompt", ""), _kind(raw.get("method")), _kind(raw.get("prior"))
        out: Dict[str, Any] = {
            "job": self.job_id,
            "state": self.state,
            "prompt": str(prompt)[:4000],
            "method": str(method)[:64],
            "prior": str(prior)[:64],
            "client": self.owner[:64],
            "step": max(int(self.step), 0),
            "total": max(int(self.total), 0),
            "created": max(float(self.created), 0.0),
            "updated": max(float(self.updated), 0.0),
            "message": self.message[:4000] if self.message else None,
            "position": position,
            "checkpoint_step": self.checkpoint_step,
            "files": list(self.files),
        }
        return out

    def to_json(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._TRANSIENT}
        out["config"] = self.config_json()
        return json_safe(out)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "JobRecord":
        """A record from job.json; its config (current or older form) is parsed here, once."""
        if not isinstance(data, dict):
            raise ValueError("job.json must hold an object")
        known = {f.name for f in fields(cls)} - set(cls._TRANSIENT)
        values = {k: v for k, v in data.items() if k in known}
        raw = values.pop("config", None)
        if not isinstance(raw, dict):
            raise ValueError(f"job.json of {values.get('job_id')!r} has no config object")
        rec = cls(config=None, **values)
        if not JOB_ID_RE.fullmatch(str(rec.job_id)) or rec.state not in JOB_STATES:
            raise ValueError(f"job.json has a bad id or state: {rec.job_id!r} {rec.state!r}")
        try:
            rec.config = parse_job(raw)
        except ConfigError as exc:
            rec.config_error, rec.stored_config = str(exc), raw
        return rec


def _kind(value: Any) -> str:
    """A section's kind in a stored config: the v1 name or the v2 object's ``kind``."""
    if isinstance(value, dict):
        value = value.get("kind", "")
    return value if isinstance(value, str) else ""


class JobStore:
    """Reads and writes the jobs folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobStoreError(f"cannot create jobs folder {self.root}: {exc}") from None
        if not os.access(self.root, os.W_OK):
            raise JobStoreError(f"jobs folder {self.root} is not writable")

    def job_dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):  # never build a path from an unchecked id
            raise ValueError(f"bad job id {job_id!r}")
        return self.root / job_id

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / CHECKPOINT_DIR

    def create(self, config: JobConfig, owner: str, input_mesh: Any = None) -> JobRecord:
        """A new job folder and record for a validated ``config`` (with a texture job's
        ``input_mesh``, written first); :class:`StorageError` leaves no folder."""
        if not isinstance(config, JobConfig):
            raise TypeError(f"JobStore.create takes a JobConfig (distill3d.config.parse_job), got {type(config).__name__}")
        job_id = new_job_id()
        while self.job_dir(job_id).exists():
            job_id = new_job_id()
        folder = self.job_dir(job_id)
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise _storage_error("create the job folder", folder, exc) from None
        rec = JobRecord(job_id=job_id, config=config, owner=owner, total=config.iters)
        try:
            if input_mesh is not None:
                path = folder / INPUT_MESH_FILE
                try:
                    input_mesh.save(path)
                except OSError as exc:
                    raise _storage_error("write the mesh to texture", path, exc) from None
            self.save(rec)
        except StorageError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return rec

    def read_input_mesh(self, job_id: str) -> Any:
        """A texture job's mesh (:class:`distill3d.texturing.InputMesh`), as it was submitted."""
        from ..texturing import InputMesh

        return InputMesh.load(self.job_dir(job_id) / INPUT_MESH_FILE)

    def save(self, rec: JobRecord) -> None:
        """Write the record's job.json atomically; raises :class:`StorageError`."""
        rec.updated = time.time()
        atomic_write_text(self.job_dir(rec.job_id) / JOB_FILE, json.dumps(rec.to_json(), indent=1, allow_nan=False))

    def load_all(self) -> List[JobRecord]:
        for trash in self.root.glob(".deleting-*"):  # a delete interrupted after its rename
            shutil.rmtree(trash, ignore_errors=True)
        records = []
        for path in sorted(self.root.glob(f"*/{JOB_FILE}")):
            try:
                rec = JobRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
                if rec.job_id != path.parent.name:
                    raise ValueError(f"job id {rec.job_id!r} does not match its folder")
                records.append(rec)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable job record %s: %s", path, exc)
        return records

    def result_files(self, job_id: str) -> List[str]:
        d = self.job_dir(job_id)
        found = []
        for name in RESULT_FILES:
            try:
                if (d / name).is_file():
                    found.append(name)
            except OSError:  # an unreadable folder lists nothing rather than failing the caller
                pass
        return found

    # ------------------------------------------------------------------ result mesh
    def write_mesh(self, job_id: str, arrays: Dict[str, np.ndarray]) -> Path:
        """Store the wire arrays exactly (npz, no pickle); atomic and fsynced; raises :class:`StorageError`."""
        path = self.job_dir(job_id) / MESH_FILE
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            _remove_quietly(tmp)
            raise _storage_error("write", path, exc) from None
        return path

    def sync_results(self, job_id: str) -> List[str]:
        """fsync every result file and the job folder (before ``done`` is announced); returns the
        files synced. Raises :class:`StorageError`."""
        d = self.job_dir(job_id)
        synced = []
        for name in self.result_files(job_id):
            path = d / name
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise _storage_error("sync", path, exc) from None
            synced.append(name)
        try:
            fsync_dir(d)
        except OSError as exc:
            raise _storage_error("sync", d, exc) from None
        return synced

    def storage_problem(self, job_id: str, exc: BaseException) -> Optional[str]:
        """Why ``exc``, raised while the job ran, is a storage fault (None when it is not):
        a :class:`StorageError`, an OSError of the storage kind (ENOSPC, EROFS, EIO, ...) or on a
        file in the job's folder, torch's checkpoint writer failing, or, failing those tests, an
        error of any kind while the job's folder itself cannot be written (probed)."""
        if isinstance(exc, StorageError):
            return str(exc)
        for cause in _chain(exc):
            if isinstance(cause, OSError) and (cause.errno in STORAGE_ERRNOS or self._in_job(job_id, cause.filename)):
                return f"cannot write the job's files in {self.job_dir(job_id)}: {_describe(cause)}"
            if isinstance(cause, RuntimeError) and _TORCH_WRITER in str(cause):
                probed = self.probe(job_id)
                reason = probed or f"the checkpoint writer failed ({str(cause)[:200]})"
                return f"cannot write the job's checkpoint in {self.checkpoint_dir(job_id)}: {reason}"
        probed = self.probe(job_id)
        return None if probed is None else f"cannot write the job's files in {self.job_dir(job_id)}: {probed}"

    def probe(self, job_id: str) -> Optional[str]:
        """Whether a small file can be written and synced in the job's folder: None, or why not."""
        path = self.job_dir(job_id) / ".probe"
        try:
            with open(path, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
            os.unlink(path)
        except OSError as exc:
            _remove_quietly(path)
            return _describe(exc)
        return None

    def _in_job(self, job_id: str, filename: Any) -> bool:
        if not filename:
            return False
        try:
            return Path(os.fsdecode(filename)).resolve().is_relative_to(self.job_dir(job_id))
        except (TypeError, ValueError, OSError):
            return False

    def read_mesh(self, job_id: str) -> Dict[str, np.ndarray]:
        """The result arrays: mesh.npz when present, else read back from result.glb."""
        d = self.job_dir(job_id)
        path = d / MESH_FILE
        if path.is_file():
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files if k in ARRAY_SLOTS}
        glb = d / "result.glb"
        if glb.is_file():
            return read_glb_arrays(glb)
        raise FileNotFoundError(f"job {job_id} has no stored mesh")

    def read_summary(self, job_id: str) -> Dict[str, Any]:
        path = self.job_dir(job_id) / "summary.json"
        if not path.is_file():
            return {}
        try:
            return json_safe(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.warning("unreadable summary for job %s: %s", job_id, exc)
            return {}

    def last_checkpoint_step(self, job_id: str) -> Optional[int]:
        """The step the job's checkpoint holds (None when it has none)."""
        from ..trainer import CHECKPOINT_NAME

        path = self.checkpoint_dir(job_id) / CHECKPOINT_NAME
        if not path.is_file():
            return None
        try:
            import torch

            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            return int(state["step"])
        except Exception as exc:  # a corrupt checkpoint: resume starts from scratch
            log.warning("unreadable checkpoint for job %s: %s", job_id, exc)
            return None

    def delete(self, job_id: str) -> None:
        """Remove the job's folder; :class:`StorageError` when it cannot be removed (it is then
        still there, so nothing is half gone from the listing)."""
        folder = self.job_dir(job_id)
        trash = folder.with_name(f".deleting-{job_id}")
        try:
            folder.rename(trash)  # one atomic step: a crash below leaves a hidden folder, not a half job
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _storage_error("delete the job folder", folder, exc) from None
        shutil.rmtree(trash, ignore_errors=True)

    def read_thumbnail(self, job_id: str, size: int = 96) -> Optional[np.ndarray]:
        """The first view of the job's preview.png turntable as uint8 RGB, at most ``size`` px (None without one)."""
        path = self.job_dir(job_id) / "preview.png"
        try:
            from PIL import Image

            with Image.open(path) as strip:
                side = min(strip.size)
                picture = strip.convert("RGB").crop((0, 0, side, side))
                picture.thumbnail((size, size))
                return np.ascontiguousarray(np.asarray(picture, dtype=np.uint8))
        except (OSError, ValueError) as exc:
            log.info("job=%s no thumbnail: %s", job_id, exc)
            return None

    def drop_checkpoint(self, job_id: str) -> None:
        d = self.checkpoint_dir(job_id)
        if d.is_dir():
            for p in d.iterdir():
                try:
                    p.unlink()
                except OSError:
                    pass
            try:
                d.rmdir()
            except OSError:
                pass


def _chain(exc: BaseException) -> List[BaseException]:
    """``exc`` and its causes and contexts (each once)."""
    seen: List[BaseException] = []
    while exc is not None and not any(exc is s for s in seen) and len(seen) < 16:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def read_glb_arrays(path: Path) -> Dict[str, np.ndarray]:
    """Read a result GLB back into wire arrays (distill3d.export's reader if present, else trimesh)."""
    from distill3d_protocol import mesh_arrays

    try:
        from ..export import read_glb  # type: ignore[attr-defined]
    except ImportError:
        read_glb = None
    if read_glb is not None:
        mesh = read_glb(path)
        return arrays_from_mesh(mesh)
    import trimesh

    scene = trimesh.load(path, process=False, force="scene")
    geoms = list(scene.dump()) if hasattr(scene, "dump") else [scene]
    mesh = trimesh.util.concatenate(geoms) if len(geoms) > 1 else geoms[0]
    # glTF is Y-up; distill3d is Z-up (Blender): (x, y, z)_gltf -> (x, -z, y)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    vertices = np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)
    visual = mesh.visual
    uv = getattr(visual, "uv", None)
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if uv is not None and image is not None:
        texture = np.asarray(image.convert("RGBA"))
        return mesh_arrays(vertices, mesh.faces, uvs=uv, texture=texture)
    colors = getattr(visual, "vertex_colors", None)
    return mesh_arrays(vertices, mesh.faces, vertex_colors=colors if colors is not None and len(colors) == len(v) else None)


def arrays_from_mesh(mesh: Any) -> Dict[str, np.ndarray]:
    """Wire arrays of a distill3d.export Mesh or TexturedMesh (duck-typed)."""
    from distill3d_protocol import mesh_arrays

    uvs = getattr(mesh, "uvs", None)
    texture = getattr(mesh, "texture", None)
    colors = getattr(mesh, "vertex_colors", None)
    if uvs is not None and texture is not None:
        return mesh_arrays(mesh.vertices, mesh.faces, uvs=uvs, texture=texture)
    return mesh_arrays(mesh.vertices, mesh.faces, vertex_colors=colors)
