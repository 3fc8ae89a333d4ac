"""Extra reference objects from a file: researchers' own shapes without editing the package.

A JSON file (or a Python file defining ``OBJECTS``, a list of the same dicts or of
:class:`~.objects.ReferenceObject`) describes objects made of the SDF parts of :mod:`.sdf`::

    {"objects": [{
        "name": "lamp",
        "description": "a desk lamp with a red shade facing the front",
        "keywords": ["lamp", "desk lamp"],
        "parts": [
            {"shape": "cylinder_z", "center": [0, 0, -0.6], "radius": 0.3, "half_height": 0.05, "color": [0.2, 0.2, 0.2]},
            {"shape": "capsule", "a": [0, 0, -0.6], "b": [0, 0, 0.2], "radius": 0.04, "color": [0.7, 0.7, 0.7]},
            {"shape": "sphere", "center": [0, -0.2, 0.3], "radius": 0.25, "color": [0.9, 0.1, 0.1], "blend": 0.05},
            {"shape": "subtract", "base": {"shape": "box", "center": [0, 0, 0], "half": [0.3, 0.3, 0.3]},
             "cut": {"shape": "sphere", "center": [0, -0.3, 0], "radius": 0.2}, "color": [1, 1, 1]}
        ]}]}

Shapes (:data:`SHAPES`): sphere, ellipsoid, box, capsule, cylinder_z, torus, round_cone,
half_space, and the combinators intersection (``of``: a list), subtract (``base``, ``cut``)
and translate (``of``, ``offset``). Each part has a ``color`` (RGB in [0, 1]) and an optional
``blend`` (smooth union with the parts before it). Like the built-in objects: Z up, the front
toward -Y, centred on the origin inside the unit cube.

Every problem is reported once, as :class:`ObjectsFileError` naming the file and the dotted
path (``lamp.json: objects[0].parts[2].radius: ...``). Registered objects join
:data:`~.objects.OBJECTS`, so prompts find them by their keywords, and their collections and
classifier banks are rendered and cached like the built-in ones (the cache key holds a
fingerprint of the object's definition, so an edited file renders again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import runpy
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..base import PriorError
from . import sdf as S
from .objects import BUILTIN_OBJECT_NAMES, OBJECTS, ReferenceObject

log = logging.getLogger(__name__)

OBJECT_FILE_SUFFIXES = (".json", ".py")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_PARTS = 64
MAX_OBJECTS = 32
#: files registered in this process: resolved path -> names of its objects
_REGISTERED: dict[str, list[str]] = {}
#: resolved path -> (mtime_ns, size) of the registered version (registering it again is free)
_STAMPS: dict[str, tuple[int, int]] = {}


class ObjectsFileError(PriorError):
    """An objects file cannot be read or describes an invalid object."""


class _Reader:
    """Validating accessors that name the dotted path of the value they reject."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> None:
        raise ObjectsFileError(f"{self.source}: {path}: {message}")

    def mapping(self, value: Any, path: str, allowed: Sequence[str], required: Sequence[str]) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object (a JSON {{...}}), got {type(value).__name__}")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            self.fail(path, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(path, f"missing field(s) {', '.join(missing)}")
        return value

    def number(self, value: Any, path: str, lo: float = -10.0, hi: float = 10.0, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            self.fail(path, f"must be > 0, got {value!r}")
        if not lo <= value <= hi:
            self.fail(path, f"must be in [{lo:g}, {hi:g}], got {value!r}")
        return float(value)

    def vector(self, value: Any, path: str, lo: float = -10.0, hi: float = 10.0, positive: bool = False) -> list[float]:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            self.fail(path, f"must be a list of 3 numbers [x, y, z], got {value!r}")
        return [self.number(v, f"{path}[{i}]", lo, hi, positive) for i, v in enumerate(value)]

    def text(self, value: Any, path: str, max_len: int = 200) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, "must be a non-empty string")
        if len(value) > max_len:
            self.fail(path, f"must be at most {max_len} characters")
        return value.strip()


def _primitive(r: _Reader, spec: Any, path: str) -> S.SDF:
    if not isinstance(spec, dict) or "shape" not in spec:
        r.fail(path, f"must be a shape object with a \"shape\" field (one of {', '.join(SHAPES)})")
    kind = spec["shape"]
    if kind not in SHAPES:
        r.fail(f"{path}.shape", f"unknown shape {kind!r}; shapes: {', '.join(SHAPES)}")
    fields, build = SHAPES[kind]
    body = {k: v for k, v in spec.items() if k not in ("shape", "color", "blend")}
    r.mapping(body, path, fields, fields if kind not in ("box", "torus") else [f for f in fields if f not in ("rounding", "axis")])
    return build(r, body, path)


def _shapes() -> dict[str, tuple[tuple[str, ...], Callable[[_Reader, dict, str], S.SDF]]]:
    def vec(r, b, p, k, **kw):
        return r.vector(b[k], f"{p}.{k}", **kw)

    def num(r, b, p, k, **kw):
        return r.number(b[k], f"{p}.{k}", **kw)

    def torus(r, b, p):
        axis = b.get("axis", 2)
        if axis not in (0, 1, 2) or isinstance(axis, bool):
            r.fail(f"{p}.axis", f"must be 0 (X), 1 (Y) or 2 (Z), got {axis!r}")
        return S.torus(vec(r, b, p, "center"), num(r, b, p, "major", positive=True), num(r, b, p, "minor", positive=True), axis)

    def listed(r, b, p, k):
        items = b[k]
        if not isinstance(items, list) or len(items) < 2:
            r.fail(f"{p}.{k}", "must be a list of at least 2 shapes")
        return [_primitive(r, item, f"{p}.{k}[{i}]") for i, item in enumerate(items)]

    return {
        "sphere": (("center", "radius"), lambda r, b, p: S.sphere(vec(r, b, p, "center"), num(r, b, p, "radius", positive=True))),
        "ellipsoid": (("center", "radii"), lambda r, b, p: S.ellipsoid(vec(r, b, p, "center"), vec(r, b, p, "radii", positive=True))),
        "box": (("center", "half", "rounding"), lambda r, b, p: S.box(
            vec(r, b, p, "center"), vec(r, b, p, "half", positive=True),
            r.number(b.get("rounding", 0.0), f"{p}.rounding", 0.0, min(r.vector(b["half"], f"{p}.half", positive=True))))),
        "capsule": (("a", "b", "radius"), lambda r, b, p: S.capsule(vec(r, b, p, "a"), vec(r, b, p, "b"), num(r, b, p, "radius", positive=True))),
        "cylinder_z": (("center", "radius", "half_height"), lambda r, b, p: S.cylinder_z(
            vec(r, b, p, "center"), num(r, b, p, "radius", positive=True), num(r, b, p, "half_height", positive=True))),
        "torus": (("center", "major", "minor", "axis"), torus),
        "round_cone": (("a", "b", "ra", "rb"), lambda r, b, p: _round_cone(r, b, p)),
        "half_space": (("normal", "offset"), lambda r, b, p: _half_space(r, b, p)),
        "intersection": (("of",), lambda r, b, p: S.intersection(*listed(r, b, p, "of"))),
        "subtract": (("base", "cut"), lambda r, b, p: S.subtract(_primitive(r, b["base"], f"{p}.base"), _primitive(r, b["cut"], f"{p}.cut"))),
        "translate": (("of", "offset"), lambda r, b, p: S.translate(_primitive(r, b["of"], f"{p}.of"), vec(r, b, p, "offset"))),
    }


def _round_cone(r: _Reader, b: dict, p: str) -> S.SDF:
    a, end = r.vector(b["a"], f"{p}.a"), r.vector(b["b"], f"{p}.b")
    if math.dist(a, end) <= 1e-6:
        r.fail(p, "a and b must differ")
    return S.round_cone(a, end, r.number(b["ra"], f"{p}.ra", positive=True), r.number(b["rb"], f"{p}.rb", positive=True))


def _half_space(r: _Reader, b: dict, p: str) -> S.SDF:
    normal = r.vector(b["normal"], f"{p}.normal")
    if math.hypot(*normal) <= 1e-9:
        r.fail(f"{p}.normal", "must not be the zero vector")
    return S.half_space(normal, r.number(b["offset"], f"{p}.offset"))


SHAPES = _shapes()
OBJECT_FIELDS = ("name", "description", "keywords", "parts")


def object_from_dict(spec: Any, path: str = "objects[0]", source: str = "<objects>") -> ReferenceObject:
    """A :class:`ReferenceObject` from its dict form (see the module docstring)."""
    r = _Reader(source)
    r.mapping(spec, path, OBJECT_FIELDS, OBJECT_FIELDS)
    name = r.text(spec["name"], f"{path}.name", 40)
    if not NAME_PATTERN.match(name):
        r.fail(f"{path}.name", f"must be lower-case letters, digits and underscores, starting with a letter; got {name!r}")
    description = r.text(spec["description"], f"{path}.description")
    keywords = spec["keywords"]
    if not isinstance(keywords, list) or not keywords:
        r.fail(f"{path}.keywords", "must be a non-empty list of prompt words")
    words = tuple(r.text(k, f"{path}.keywords[{i}]", 60).lower() for i, k in enumerate(keywords))
    parts_spec = spec["parts"]
    if not isinstance(parts_spec, list) or not parts_spec:
        r.fail(f"{path}.parts", "must be a non-empty list of parts")
    if len(parts_spec) > MAX_PARTS:
        r.fail(f"{path}.parts", f"at most {MAX_PARTS} parts, got {len(parts_spec)}")
    parts = []
    for i, part in enumerate(parts_spec):
        pp = f"{path}.parts[{i}]"
        sdf = _primitive(r, part, pp)
        if "color" not in part:
            r.fail(pp, "missing field color (RGB in [0, 1])")
        color = tuple(r.vector(part["color"], f"{pp}.color", 0.0, 1.0))
        blend = r.number(part.get("blend", 0.0), f"{pp}.blend", 0.0, 1.0)
        parts.append(S.Part(sdf, color, blend=blend))
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    obj = ReferenceObject(name, description, words, S.Shape(parts), fingerprint=fingerprint)
    try:
        obj.bounding_radius  # noqa: B018 - the object must be non-empty inside the unit cube
    except ValueError:
        r.fail(path, f"object {name!r} has no surface inside the unit cube [-1, 1]^3 (the reference cameras look there)")
    return obj


def _read(path: Path) -> tuple[list[Any], str]:
    """The file's object entries and a fingerprint of its bytes."""
    source = str(path)
    if not path.is_file():
        raise ObjectsFileError(f"objects file {source} does not exist")
    if path.suffix not in OBJECT_FILE_SUFFIXES:
        raise ObjectsFileError(f"objects file {source} must be .json or .py")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    if path.suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ObjectsFileError(f"{source}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            _Reader(source).mapping(data, "(top level)", ("objects",), ("objects",))
            data = data["objects"]
    else:
        try:
            namespace = runpy.run_path(source)
        except Exception as exc:  # a user's Python file: report, don't crash
            raise ObjectsFileError(f"{source}: running the file failed: {type(exc).__name__}: {exc}") from None
        if "OBJECTS" not in namespace:
            raise ObjectsFileError(f"{source}: a Python objects file must define OBJECTS, a list of objects")
        data = namespace["OBJECTS"]
    if not isinstance(data, (list, tuple)) or not data:
        raise ObjectsFileError(f"{source}: objects must be a non-empty list")
    if len(data) > MAX_OBJECTS:
        raise ObjectsFileError(f"{source}: objects: at most {MAX_OBJECTS} objects, got {len(data)}")
    return list(data), digest


def load_objects_file(path: str | os.PathLike) -> list[ReferenceObject]:
    """The objects a file describes, validated (not registered)."""
    file = Path(path).expanduser()
    entries, digest = _read(file)
    objects = []
    for i, entry in enumerate(entries):
        if isinstance(entry, ReferenceObject):
            if entry.fingerprint is None:
                entry.fingerprint = hashlib.sha256(f"{digest}:{entry.name}".encode()).hexdigest()[:16]
            objects.append(entry)
        else:
            objects.append(object_from_dict(entry, f"objects[{i}]", str(file)))
    names = [o.name for o in objects]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ObjectsFileError(f"{file}: objects: the name(s) {', '.join(dupes)} appear more than once")
    return objects


def register_objects_file(path: str | os.PathLike) -> list[str]:
    """Validate the file and add its objects to :data:`~.objects.OBJECTS`; returns their names.
    Registering the same file again replaces its objects (an edited file); a name that a
    built-in object or another file already uses is refused."""
    file = Path(path).expanduser()
    key = str(file.resolve()) if file.exists() else str(file)
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    if stamp is not None and _STAMPS.get(key) == stamp and all(n in OBJECTS for n in _REGISTERED.get(key, [None])):
        return list(_REGISTERED[key])
    objects = load_objects_file(file)
    owners = {n: f for f, names in _REGISTERED.items() for n in names}
    for obj in objects:
        if obj.name in BUILTIN_OBJECT_NAMES:
            raise ObjectsFileError(f"{file}: object {obj.name!r} has the name of a built-in object; choose another name")
        if obj.name in owners and owners[obj.name] != key:
            raise ObjectsFileError(f"{file}: object {obj.name!r} is already registered from {owners[obj.name]}")
    for name in _REGISTERED.pop(key, []):
        OBJECTS.pop(name, None)
    for obj in objects:
        OBJECTS[obj.name] = obj
    _REGISTERED[key] = [o.name for o in objects]
    if stamp is not None:
        _STAMPS[key] = stamp
    log.info("registered reference objects %s from %s", ", ".join(_REGISTERED[key]), file)
    return list(_REGISTERED[key])


def unregister_objects_file(path: str | os.PathLike) -> None:
    """Remove a file's objects again (tests; a server keeps them)."""
    file = Path(path).expanduser()
    key = str(file.resolve()) if file.exists() else str(file)
    _STAMPS.pop(key, None)
    for name in _REGISTERED.pop(key, []):
        OBJECTS.pop(name, None)


def is_objects_file(entry: str) -> bool:
    return entry.lower().endswith(OBJECT_FILE_SUFFIXES)


def resolve_object_entries(entries: Sequence[str]) -> Optional[list[str]]:
    """The object names of a ``prior.objects`` list: names stay, files are registered and
    contribute all their objects; with no names, every built-in object joins. () -> None
    (the prior's default: every registered object)."""
    if not entries:
        return None
    names = [e for e in entries if not is_objects_file(e)]
    extra: list[str] = []
    for entry in entries:
        if is_objects_file(entry):
            extra += register_objects_file(entry)
    base = names if names else list(BUILTIN_OBJECT_NAMES)
    return base + [n for n in extra if n not in base]
