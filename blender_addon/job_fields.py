"""The panel's view of the job description: one :class:`PanelSetting` per value of the job.

Every setting of ``JobConfig`` (shared/distill3d_protocol/jobconfig.py) becomes one entry of
:data:`PANEL_SETTINGS`, derived from the description, never retyped: its dotted job path, the
identifier of its Blender property, when it applies (which method/prior/field kinds have it),
its label, and how a panel value converts to the job's JSON value and back. The camera
source is one of these unions (``cameras``: Automatic / Random orbit / Scene cameras, its
distribution's ranges generated like any other setting); only a rig's list of cameras is no
property: the add-on builds it from the scene's camera objects (:data:`NOT_PROPERTIES`). ``properties``
turns the entries into Blender properties, ``panel`` draws them, and both job directions
(panel -> submitted job, stored job -> panel) go through :meth:`PanelSetting.read` and
:meth:`PanelSetting.write`. No bpy here: the entries work on any object with the attributes
(a Scene's PropertyGroup, or the batch script's ``SimpleNamespace``).

Property identifiers are the dotted path with ``__`` for each dot (``method.lam`` ->
``method__lam``, ``renderer.samples_per_ray`` -> ``renderer__samples_per_ray``); the kind of a
union is the union's own name (``method.kind`` -> ``method``, ``field.kind`` -> ``field``,
``cameras.kind`` -> ``cameras``).
A setting that two alternatives of a union declare with different defaults or bounds gets one
property per alternative, the kind in the middle (``field.hidden``: ``field__dense__hidden``,
``field__hash__hidden``). How each kind of value is held by the panel:

=========================== =============================================================
bool, int, float, str       a property of the same type (ints: Blender's 32-bit range)
int with pow2               a menu of the powers of two in its range, identifiers "16", ...
choice                      a menu; a union's kind lists the registry's LABEL and HELP
                            (a nullable union: first the item :data:`AUTO`, "Automatic")
nullable number             the number plus ``<name>_auto`` (True: null, the backend's default)
nullable choice / str       the item :data:`AUTO` / the empty string mean null
floats/ints with a length   a vector property
other lists                 text, comma separated ("to_q, to_k")
json                        JSON text (empty: null); a rig's ``cameras.cameras`` is the scene's
=========================== =============================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ._protocol import ConfigError, JobConfig, recipes, records

Setting = records.Setting
KIND_KEY = records.KIND_KEY

INT_MIN, INT_MAX = -(2**31), 2**31 - 1  # Blender's IntProperty is 32-bit
AUTO = "auto"  # the menu item that stands for null in a nullable choice (the field kind: "let the backend choose")
AUTO_SUFFIX = "_auto"
MAX_IDENTIFIER = 63  # Blender's limit on property identifiers

# JobConfig values the generic properties leave to other parts of the add-on, and why.
NOT_PROPERTIES = {
    "cameras.cameras": "a rig's cameras: the scene's camera objects (or a collection's) when the job is made",
    "version": "always the protocol's CONFIG_VERSION (older stored jobs are migrated when loaded)",
    "geometry": "the shape: Generate leaves it to the prompt; Texture selected sends the selected mesh (its settings at "
                "their defaults)",
}


def not_a_property(path: str) -> bool:
    """Whether the job value at ``path`` (or a section above it) is left to other parts of the add-on."""
    return any(path == key or path.startswith(key + ".") for key in NOT_PROPERTIES)

def flat_paths(overrides: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"method": {"kind": "esd", "lam": 1}}`` -> ("method.kind", "esd"), ("method.lam", 1): a
    union's kind first, so the settings after it apply to the kind it chose."""
    for key, value in sorted(overrides.items(), key=lambda kv: kv[0] != KIND_KEY):
        if isinstance(value, dict):
            yield from flat_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


#: a fresh panel starts from the default prior's measured best estimator (protocol recipes.RECOMMENDED:
#: esd-exact at lambda 1 with view-dependent prompts for the reference world), not the description's plain SDS
PANEL_DEFAULTS: dict[str, Any] = dict(flat_paths(recipes.recommended_for(JobConfig().prior.KIND)[1]))

# Words shown in capitals in labels derived from field names ("lora_lr" -> "LoRA LR").
_LABEL_WORDS = {"lr": "LR", "mlp": "MLP", "mlps": "MLPs", "lora": "LoRA", "cpu": "CPU", "vae": "VAE", "ema": "EMA", "occ": "occupancy",
                "dtype": "data type"}


def label_of(name: str) -> str:
    """A readable label from a field name: ``samples_per_ray`` -> "Samples per ray"."""
    text = " ".join(_LABEL_WORDS.get(w, w) for w in name.split("_") if w)
    return text[:1].upper() + text[1:]


def float32(value: float) -> float:
    """``value`` as Blender stores it (32-bit), as the shortest decimal that reads back to it
    (a panel's 0.3 is sent as 0.3, not 0.30000001192092896)."""
    value = float(value)
    if not math.isfinite(value):
        return value
    stored = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(6, 10):
        text = float(f"{stored:.{digits}g}")
        if struct.unpack("f", struct.pack("f", text))[0] == stored:
            return text
    return stored


@dataclass(frozen=True)
class PanelSetting:
    """One value of the job as the panel holds it."""

    path: str  # dotted job path: "method.lam", "method.kind"
    name: str  # the Blender property's identifier: "method__lam", "method"
    setting: Setting
    default: Any  # in the job's JSON form (None: null)
    requires: tuple = ()  # ((union path, frozenset of kinds), ...) for settings of some alternatives only
    registry: Any = None  # for a union's kind: the Registry of its alternatives

    # -------------------------------------------------------------- what it is
    @property
    def label(self) -> str:
        if self.setting.label:
            return self.setting.label
        parts = self.path.split(".")
        return label_of(parts[-2] if parts[-1] == KIND_KEY and self.registry is not None else parts[-1])

    @property
    def description(self) -> str:
        text = self.setting.help
        return text[:1].upper() + text[1:]

    @property
    def section(self) -> str:
        """The job section it belongs to ("" for the job's top-level settings)."""
        return self.path.split(".")[0] if "." in self.path else ""

    @property
    def union_path(self) -> Optional[str]:
        """For a union's kind: the union's path ("method")."""
        return self.path[: -len(KIND_KEY) - 1] if self.registry is not None else None

    @property
    def null_meaning(self) -> str:
        """What null stands for, from the help ("null = the prior's recommendation"), or ""."""
        _, sep, rest = self.setting.help.partition("null = ")
        return rest.strip() if sep else ""

    @property
    def auto_name(self) -> Optional[str]:
        """The "use the default" toggle of a nullable number."""
        return self.name + AUTO_SUFFIX if self.has_auto_toggle else None

    @property
    def has_auto_toggle(self) -> bool:
        return self.setting.nullable and self.setting.kind in ("int", "float")

    @property
    def is_menu(self) -> bool:
        return self.registry is not None or self.setting.kind == "choice" or self.is_pow2_menu

    @property
    def is_pow2_menu(self) -> bool:
        return self.setting.kind == "int" and self.setting.pow2 and self.setting.lo is not None and self.setting.hi is not None

    @property
    def is_vector(self) -> bool:
        return self.setting.kind in ("floats", "ints") and self.setting.length is not None

    @property
    def is_text_list(self) -> bool:
        return self.setting.kind in ("floats", "ints", "strs") and self.setting.length is None

    def menu_items(self) -> list[tuple[str, str, str]]:
        """``(identifier, label, description)`` of a menu (a union's kind, a choice, a pow2 int)."""
        items = []
        if self.setting.nullable:
            meaning = self.null_meaning
            items.append((AUTO, "Automatic", f"Let the backend choose: {meaning}" if meaning else f"Let the backend choose ({self.setting.help})"))
        if self.registry is not None:
            items += [(name, cls.LABEL, cls.HELP) for name, cls in self.registry.classes.items()]
        elif self.is_pow2_menu:
            n = 1
            while n <= self.setting.hi:
                if n >= self.setting.lo:
                    items.append((str(n), str(n), ""))
                n *= 2
        else:
            items += [(c, c, "") for c in self.setting.choices]
        return items

    @property
    def panel_default(self) -> Any:
        """The property's default, in the panel's form: the description's, except where the
        default prior's measured best estimator differs (:data:`PANEL_DEFAULTS`)."""
        if self.has_auto_toggle:
            return self.auto_value
        return self.to_panel(PANEL_DEFAULTS.get(self.path, self.default))

    @property
    def auto_value(self) -> Any:
        """The number a nullable number's field shows while "Auto" is on: 1 (kept in range)."""
        lo = self.setting.lo if self.setting.lo is not None else -math.inf
        hi = self.setting.hi if self.setting.hi is not None else math.inf
        value = min(max(1.0, lo), hi)
        return int(value) if self.setting.kind == "int" else float(value)

    # -------------------------------------------------------------- panel <-> job
    def applies(self, settings: Any) -> bool:
        """Whether the kinds chosen in ``settings`` have this setting."""
        return all(chosen_kind(settings, union) in kinds for union, kinds in self.requires)

    def read(self, settings: Any) -> Any:
        """The job's value from the panel's property (ConfigError when it cannot be one)."""
        if self.has_auto_toggle and getattr(settings, self.auto_name):
            return None
        return self.to_job(getattr(settings, self.name))

    def write(self, settings: Any, value: Any) -> None:
        """Show the job's (validated) ``value`` in the panel."""
        if self.has_auto_toggle:
            setattr(settings, self.auto_name, value is None)
            if value is None:
                return
        setattr(settings, self.name, self.to_panel(value))

    def to_job(self, value: Any) -> Any:
        s = self.setting
        if self.is_menu:
            value = str(value)
            if s.nullable and value == AUTO:
                return None
            return int(value) if self.is_pow2_menu else value
        if s.kind == "bool":
            return bool(value)
        if s.kind == "int":
            return int(value)
        if s.kind == "float":
            return float32(value)
        if s.kind == "str":
            return None if s.nullable and not str(value) else str(value)
        if s.kind == "json":
            return self._json(value)
        if self.is_vector or isinstance(value, (list, tuple)):
            return [self._item(v) for v in value]
        return [self._item(part) for part in (p.strip() for p in str(value).split(",")) if part]

    def to_panel(self, value: Any) -> Any:
        s = self.setting
        if self.is_menu:
            return AUTO if value is None else str(value)
        if s.kind == "int" and not INT_MIN <= int(value) <= INT_MAX:
            raise ConfigError(f"{self.path}={value} is beyond the panel's 32-bit integer range")
        if s.kind in ("bool", "int", "float"):
            return value
        if s.kind == "str":
            return "" if value is None else value
        if s.kind == "json":
            return "" if value is None else json.dumps(value)
        if self.is_vector:
            return tuple(value)
        return ", ".join(str(v) for v in value)

    def _item(self, text: Any) -> Any:
        kind = self.setting.kind
        try:
            if kind == "strs":
                return str(text)
            if kind == "ints":
                return int(text)
            return float32(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.path} must be {self.setting.describe()} (comma separated), got {text!r}") from None

    def _json(self, text: Any) -> Any:
        if not isinstance(text, str):
            return text
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path} must be JSON: {exc}") from None


# ----------------------------------------------------------------------------- the table


def _walk(cls: type, prefix: str = "", requires: tuple = ()) -> Iterator[PanelSetting]:
    for name, spec, default in records.record_fields(cls):
        path = prefix + name
        ident = path.replace(".", "__")
        if isinstance(spec, Setting):
            yield PanelSetting(path, ident, spec, None if default is dataclasses.MISSING else records.to_dict(default), requires)
        elif spec.record is not None:
            yield from _walk(spec.record, path + ".", requires)
        else:
            reg = spec.registry
            kind = Setting("choice", spec.help, choices=reg.names, nullable=spec.nullable)
            yield PanelSetting(f"{path}.{KIND_KEY}", ident, kind, getattr(default, "KIND", None), requires, reg)
            yield from _alternatives(reg, path, ident, requires)


def _alternatives(reg: Any, path: str, ident: str, requires: tuple) -> Iterator[PanelSetting]:
    """The settings of a union's alternatives, one entry per path where they agree."""
    by_path: dict[str, list[PanelSetting]] = {}
    for kind_name, sub in reg.classes.items():
        for entry in _walk(sub, path + ".", requires + ((path, frozenset({kind_name})),)):
            by_path.setdefault(entry.path, []).append(entry)
    depth = len(requires)
    for entries in by_path.values():
        first = entries[0]
        same = all(dataclasses.replace(e.setting, help="") == dataclasses.replace(first.setting, help="") and e.default == first.default
                   and e.registry is first.registry for e in entries)
        if same:
            kinds = frozenset().union(*(e.requires[depth][1] for e in entries))
            yield dataclasses.replace(first, requires=first.requires[:depth] + ((path, kinds),) + first.requires[depth + 1 :])
        else:
            for e in entries:
                (kind_name,) = e.requires[depth][1]
                rest = e.name[len(ident) + 2 :]
                yield dataclasses.replace(e, name=f"{ident}__{kind_name.replace('-', '_')}__{rest}")


def _build() -> tuple[PanelSetting, ...]:
    table = tuple(e for e in _walk(JobConfig) if not not_a_property(e.path))
    names: set[str] = set()
    for e in table:
        for ident in (e.name, e.auto_name):
            if ident is None:
                continue
            if ident in names or len(ident) > MAX_IDENTIFIER or not ident.isidentifier():
                raise TypeError(f"the job setting {e.path} cannot become the Blender property {ident!r}")
            names.add(ident)
        if e.setting.nullable and e.is_menu and AUTO in e.setting.choices:
            raise TypeError(f"{e.path}: the choice {AUTO!r} would be mistaken for null")
    return table


PANEL_SETTINGS: tuple[PanelSetting, ...] = _build()
BY_NAME = {e.name: e for e in PANEL_SETTINGS}
KIND_SETTINGS = {e.union_path: e for e in PANEL_SETTINGS if e.registry is not None}  # "method" -> its kind menu


def by_path(path: str) -> list[PanelSetting]:
    """The entries holding the job value at ``path`` (several for per-alternative settings)."""
    return [e for e in PANEL_SETTINGS if e.path == path]


def applicable(path: str, settings: Any) -> Optional[PanelSetting]:
    """The entry that holds ``path`` for the kinds chosen in ``settings`` (None: not a setting of them)."""
    return next((e for e in PANEL_SETTINGS if e.path == path and e.applies(settings)), None)


def chosen_kind(settings: Any, union_path: str) -> Optional[str]:
    """The kind chosen for a union ("esd"), None when null ("automatic")."""
    return KIND_SETTINGS[union_path].read(settings)


def chosen_class(settings: Any, union_path: str) -> Optional[type]:
    """The record class of the chosen kind (``ESDConfig``), None when null."""
    kind = chosen_kind(settings, union_path)
    return None if kind is None else KIND_SETTINGS[union_path].registry.classes[kind]


def has_setting(settings: Any, path: str) -> bool:
    """Whether the chosen kinds have ``path`` ("does the chosen method have a lam?")."""
    return applicable(path, settings) is not None


def job_values(settings: Any) -> dict:
    """The nested job dict of every applicable setting (not yet: a rig's cameras, the version)."""
    job: dict = {}
    for e in PANEL_SETTINGS:
        if not e.applies(settings):
            continue
        value = e.read(settings)
        if e.registry is not None and value is None:
            records.set_path(job, e.union_path, None)
        else:
            records.set_path(job, e.path, value)
    return job


def panel_message(exc: ConfigError) -> str:
    """A ConfigError's message plus the panel label of the setting it names."""
    text = str(exc)
    for path in sorted({e.path for e in PANEL_SETTINGS}, key=len, reverse=True):
        if text.startswith(path + " ") or f" {path} " in text or text.startswith(path + ":") or text.startswith(path + "="):
            entry = by_path(path)[0]
            where = entry.section.capitalize() if entry.section else "Job"
            return f"{text} (panel: {where} › {entry.label})"
    return text
