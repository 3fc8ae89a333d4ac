"""Typed settings records: one declaration per setting (default, bounds, choices, help), and
everything derived from it: validation with dotted error paths, dict form, JSON Schema, the
list of dotted paths that CLIs and panels expose.

A record is a dataclass whose fields are declared with :func:`setting` (a value),
:func:`section` (a nested record) or :func:`union` (one of several records, chosen by the
``"kind"`` key of its dict form, see :class:`Registry`). A record may define
``check(self, path)`` for rules between its fields; it raises :class:`ConfigError`.

    build(JobConfig, {"prompt": "a duck", "method": {"kind": "esd", "lam": 2}})
    -> ConfigError: method.lam must lie in [0, 1], got 2

Pure Python: imported by the backend, the wire codec and the Blender add-on alike.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .errors import ConfigError

KINDS = ("bool", "int", "float", "str", "choice", "floats", "ints", "strs", "json")
_META = "distill3d"
KIND_KEY = "kind"


@dataclass(frozen=True)
class Setting:
    """What one value may be. ``kind`` is one of :data:`KINDS`; ``floats``/``strs`` are
    lists (``length`` fixes a length); ``soft_lo``/``soft_hi`` are a panel's slider range."""

    kind: str
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    choices: Tuple[str, ...] = ()
    nullable: bool = False
    pow2: bool = False
    length: Optional[int] = None
    min_items: int = 0
    max_len: int = 4096
    soft_lo: Optional[float] = None
    soft_hi: Optional[float] = None
    label: str = ""
    required: bool = False
    multiple_of: Optional[int] = None

    def describe(self) -> str:
        """The allowed values in words (for errors and help texts)."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind in ("int", "float"):
            word = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                span = f"{'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}]"
                text = f"lie in {span}" if self.kind == "float" else f"{word} in {span}"
            elif self.lo is not None:
                text = f"{word} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
            else:
                text = word
            if self.pow2:
                text += ", a power of two"
            if self.multiple_of:
                text += f", a multiple of {self.multiple_of}"
        elif self.kind == "floats":
            n = f"{self.length} numbers" if self.length else "a list of numbers"
            text = n + (f" in [{_fmt(self.lo)}, {_fmt(self.hi)}]" if self.lo is not None and self.hi is not None else "")
        elif self.kind == "strs":
            text = f"a list of at least {self.min_items} non-empty strings"
        elif self.kind == "str":
            text = f"a {'non-empty ' if self.required else ''}string of at most {self.max_len} characters"
        else:
            text = "a JSON value"
        return text + (" or null" if self.nullable else "")


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _infer_kind(default: Any, choices: tuple) -> str:
    if choices:
        return "choice"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in default):
        return "ints"
    if isinstance(default, tuple) and all(isinstance(v, (int, float)) for v in default):
        return "floats"
    if isinstance(default, tuple):
        return "strs"
    raise TypeError(f"cannot infer the kind of a setting with default {default!r}: pass kind=")


def setting(default: Any = MISSING, help: str = "", *, kind: Optional[str] = None, choices: Tuple[str, ...] = (), **rules: Any) -> Any:
    """A dataclass field holding one value; see :class:`Setting` for ``rules``."""
    if not help:
        raise TypeError("every setting needs a one-line help text")
    k = kind or _infer_kind(default, choices)
    if k not in KINDS:
        raise TypeError(f"unknown setting kind {k!r}")
    meta = Setting(kind=k, help=help, choices=tuple(choices), **rules)
    if default is MISSING:
        return dataclasses.field(metadata={_META: meta})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclass(frozen=True)
class Section:
    """A nested record (``record``), or with ``registry`` one of several chosen by ``kind``."""

    help: str
    record: Optional[type] = None
    registry: Optional["Registry"] = None
    nullable: bool = False


class Registry:
    """Record classes by name: the alternatives of a :func:`union` (methods, priors, fields).

    ``@registry.register("esd", label="ESD", help="...")`` on a record class adds it; its name
    is then ``cls.KIND`` (``cls.LABEL``, ``cls.HELP`` for menus). The backend maps the same classes to implementations."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.classes: Dict[str, type] = {}

    def register(self, name: str, label: str, help: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in self.classes:
                raise TypeError(f"{self.what} {name!r} registered twice")
            cls.KIND, cls.LABEL, cls.HELP = name, label, help
            cls.what = f"{name} {self.what}"
            self.classes[name] = cls
            return cls

        return add

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.classes)

    def get(self, name: Any, path: str) -> type:
        if not isinstance(name, str) or name not in self.classes:
            raise ConfigError(f"{path} must be one of {', '.join(self.classes)}, got {name!r}")
        return self.classes[name]


def section(record: type, help: str) -> Any:
    """A dataclass field holding a nested record (defaults: the record's own)."""
    return dataclasses.field(default_factory=record, metadata={_META: Section(help=help, record=record)})


def union(registry: Registry, default: Optional[str], help: str) -> Any:
    """A dataclass field holding one record of ``registry``; ``default`` None means null."""
    meta = Section(help=help, registry=registry, nullable=default is None)
    if default is None:
        return dataclasses.field(default=None, metadata={_META: meta})
    return dataclasses.field(default_factory=lambda: registry.classes[default](), metadata={_META: meta})


# ----------------------------------------------------------------------------- introspection


def spec_of(f: dataclasses.Field) -> Any:
    try:
        return f.metadata[_META]
    except KeyError:
        raise TypeError(f"field {f.name!r} is declared without setting()/section()/union()") from None


def record_fields(cls: type) -> List[Tuple[str, Any, Any]]:
    """``(name, Setting | Section, default)`` of each field of a record class."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        out.append((f.name, spec_of(f), default))
    return out


def leaf_paths(cls: type, prefix: str = "") -> Iterator[Tuple[str, Setting, Any]]:
    """Every value of a record class as ``(dotted path, Setting, default)``; a union contributes
    its ``kind`` and the fields of every alternative (``method.lam`` from ESD, ...)."""
    for name, spec, default in record_fields(cls):
        path = prefix + name
        if isinstance(spec, Setting):
            yield path, spec, default
        elif spec.record is not None:
            yield from leaf_paths(spec.record, path + ".")
        else:
            reg = spec.registry
            yield path + "." + KIND_KEY, Setting("choice", spec.help, choices=reg.names, nullable=spec.nullable), getattr(default, "KIND", None)
            seen = set()
            for sub in reg.classes.values():
                for p, s, d in leaf_paths(sub, path + "."):
                    if p not in seen:
                        seen.add(p)
                        yield p, s, d


def owners(cls: type, dotted: str) -> List[type]:
    """The record classes (alternatives of unions included) that have the field ``dotted``."""
    head, _, rest = dotted.partition(".")
    for name, spec, _ in record_fields(cls):
        if name != head:
            continue
        if not rest:
            return [cls]
        if isinstance(spec, Setting):
            return []
        subs = [spec.record] if spec.record is not None else list(spec.registry.classes.values())
        if rest == KIND_KEY and spec.registry is not None:
            return [cls]
        return [o for sub in subs for o in owners(sub, rest)]
    return []


# ----------------------------------------------------------------------------- validation


def check_value(path: str, spec: Setting, value: Any) -> Any:
    """``value`` (normalised: int/float, list) if ``spec`` allows it, else ConfigError."""
    if value is None:
        if spec.nullable:
            return None
        raise _bad(path, spec, value)
    k = spec.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise _bad(path, spec, value)
        return value
    if k == "choice":
        if not isinstance(value, str) or value not in spec.choices:
            raise _bad(path, spec, value)
        return value
    if k == "str":
        if not isinstance(value, str) or len(value) > spec.max_len or (spec.required and not value.strip()):
            raise _bad(path, spec, value)
        return value
    if k in ("int", "float"):
        return _number(path, spec, value)
    if k in ("floats", "ints"):
        if not isinstance(value, (list, tuple)) or (spec.length is not None and len(value) != spec.length) or len(value) < spec.min_items:
            raise _bad(path, spec, value)
        item = dataclasses.replace(spec, kind="float" if k == "floats" else "int")
        return tuple(_number(f"{path}[{i}]", item, v) for i, v in enumerate(value))
    if k == "strs":
        if not isinstance(value, (list, tuple)) or len(value) < spec.min_items or not all(isinstance(v, str) and v for v in value):
            raise _bad(path, spec, value)
        return tuple(value)
    return value  # json: checked by the wire's bounded-JSON rule and by the record's check()


def _number(path: str, spec: Setting, value: Any) -> Any:
    given = value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(path, spec, given)
    if spec.kind == "int":
        if not float(value).is_integer():
            raise _bad(path, spec, given)
        value = int(value)
    else:
        value = float(value)
    if spec.lo is not None and (value < spec.lo or (spec.lo_open and value == spec.lo)):
        raise _bad(path, spec, given)
    if spec.hi is not None and value > spec.hi:
        raise _bad(path, spec, given)
    if spec.pow2 and (value <= 0 or int(value) & (int(value) - 1)):
        raise _bad(path, spec, given)
    if spec.multiple_of and int(value) % spec.multiple_of:
        raise _bad(path, spec, given)
    return value


def _bad(path: str, spec: Setting, value: Any) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    allowed = spec.describe()
    return ConfigError(f"{path} must {'' if allowed.startswith('lie in') else 'be '}{allowed}, got {shown}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """A validated ``cls`` record from its dict form ``data`` (missing fields: defaults).

    Unknown fields, wrong types, values out of range and broken cross-field rules raise
    :class:`ConfigError` naming the dotted path. An instance of ``cls`` is re-validated."""
    if isinstance(data, cls):
        data = to_dict(data)
    where = path or getattr(cls, "what", cls.__name__)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
    specs = {name: (spec, default) for name, spec, default in record_fields(cls)}
    allowed = set(specs) | ({KIND_KEY} if getattr(cls, "KIND", None) else set())
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        owner = f"{where} ({cls.KIND})" if getattr(cls, "KIND", None) and path else where
        raise ConfigError(f"{owner}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}", "unknown_field")
    kwargs = {}
    for name, (spec, default) in specs.items():
        sub = f"{path}.{name}" if path else name
        if name not in data:
            if isinstance(spec, Setting) and spec.required:
                raise ConfigError(f"{sub} is required", "missing_field")
            continue
        value = data[name]
        if isinstance(spec, Setting):
            kwargs[name] = check_value(sub, spec, value)
        elif spec.record is not None:
            kwargs[name] = build(spec.record, value, sub)
        else:
            kwargs[name] = build_union(spec, value, sub, default)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def build_union(spec: Section, value: Any, path: str, default: Any = None) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{path} must be an object with a kind, got None")
    if isinstance(value, tuple(spec.registry.classes.values())):
        value = to_dict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must be an object with kind one of {', '.join(spec.registry.names)}, got {type(value).__name__}")
    name = value.get(KIND_KEY, getattr(default, "KIND", None))
    cls = spec.registry.get(name, f"{path}.{KIND_KEY}")
    own = {f.name for f in dataclasses.fields(cls)} | {KIND_KEY}
    foreign = [k for k in value if k not in own]
    if foreign:
        others = {k: [n for n, c in spec.registry.classes.items() if k in {f.name for f in dataclasses.fields(c)}] for k in foreign}
        said = "; ".join(f"{k} is a setting of {', '.join(v)}" if v else f"{k} is no setting of any {spec.registry.what}"
                         for k, v in others.items())
        raise ConfigError(f"{path} ({cls.KIND}) has no setting {', '.join(foreign)} ({said}); "
                          f"its settings: {', '.join(sorted(own - {KIND_KEY})) or 'none'}", "unknown_field")
    return build(cls, {k: v for k, v in value.items() if k != KIND_KEY}, path)


def to_dict(obj: Any) -> Any:
    """The JSON form of a record (tuples as lists; union members carry their ``kind``)."""
    if obj is None or not dataclasses.is_dataclass(obj):
        return list(obj) if isinstance(obj, tuple) else obj
    out: Dict[str, Any] = {}
    if getattr(type(obj), "KIND", None):
        out[KIND_KEY] = type(obj).KIND
    for f in dataclasses.fields(obj):
        out[f.name] = to_dict(getattr(obj, f.name))
    return out


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Put ``value`` at ``dotted`` in a nested dict (creating objects on the way)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {} if nxt is None or not isinstance(nxt, dict) else nxt
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- JSON Schema


def json_schema(cls: type, title: str = "") -> dict:
    """A JSON Schema (draft 2020-12) of a record class's dict form."""
    schema = _record_schema(cls)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    if title:
        schema["title"] = title
    return schema


def _record_schema(cls: type) -> dict:
    props: Dict[str, Any] = {}
    required = []
    if getattr(cls, "KIND", None):
        props[KIND_KEY] = {"const": cls.KIND, "description": cls.HELP}
        required.append(KIND_KEY)
    for name, spec, default in record_fields(cls):
        if isinstance(spec, Setting):
            props[name] = _value_schema(spec, default)
            if spec.required:
                required.append(name)
        elif spec.record is not None:
            props[name] = {**_record_schema(spec.record), "description": spec.help}
        else:
            alts = [_record_schema(sub) for sub in spec.registry.classes.values()]
            if spec.nullable:
                alts.append({"type": "null"})
            props[name] = {"description": spec.help, "oneOf": alts}
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__:
        out["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        out["required"] = required
    return out


def _value_schema(spec: Setting, default: Any) -> dict:
    k = spec.kind
    if k == "bool":
        s: Dict[str, Any] = {"type": "boolean"}
    elif k == "choice":
        s = {"type": "string", "enum": list(spec.choices)}
    elif k == "str":
        s = {"type": "string", "maxLength": spec.max_len}
        if spec.required:
            s["minLength"] = 1
    elif k in ("int", "float"):
        s = {"type": "integer" if k == "int" else "number"}
        if spec.lo is not None:
            s["exclusiveMinimum" if spec.lo_open else "minimum"] = spec.lo
        if spec.hi is not None:
            s["maximum"] = spec.hi
        if spec.multiple_of:
            s["multipleOf"] = spec.multiple_of
    elif k in ("floats", "ints"):
        item: Dict[str, Any] = {"type": "number" if k == "floats" else "integer"}
        if spec.lo is not None:
            item["minimum"] = spec.lo
        if spec.hi is not None:
            item["maximum"] = spec.hi
        s = {"type": "array", "items": item, "minItems": spec.min_items}
        if spec.length:
            s["minItems"] = s["maxItems"] = spec.length
    elif k == "strs":
        s = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": spec.min_items}
    else:
        s = {}
    if spec.nullable and s:
        s = {"anyOf": [s, {"type": "null"}]}
    s["description"] = spec.help
    if default is not MISSING:
        s["default"] = list(default) if isinstance(default, tuple) else default
    return s
