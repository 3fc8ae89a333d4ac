"""For reachability tests: every setting of a job with a valid value other than its default.

``changed_settings()`` yields ``(path, value, kinds)`` where ``kinds`` are the union kinds that
must be chosen for the path to exist (``{"method": "esd"}`` for ``method.lam``).
"""

from __future__ import annotations

from typing import Any, Iterator

from distill3d_protocol.jobconfig import JobConfig
from distill3d_protocol.settings import KIND_KEY, Setting, leaf_paths, owners, record_fields

# settings a reachability test does not change generically: a rig's cameras come from a scene (their
# own tests), so the camera source stays a distribution; version is the form's own marker
NOT_GENERIC = ("cameras.kind", "cameras.cameras", "version")


def _unions() -> dict[str, Any]:
    return {name: spec.registry for name, spec, _ in record_fields(JobConfig) if getattr(spec, "registry", None) is not None}


def other_value(spec: Setting, default: Any) -> Any:
    """A valid value != default (near the default, so rules between settings still hold)."""
    if spec.kind == "bool":
        return not default
    if spec.kind == "choice":
        others = [c for c in spec.choices if c != default and c not in ("analytic", "grid")]
        return others[0]
    if spec.kind == "str":
        return "x" if default != "x" else "y"
    if spec.kind == "strs":
        return ("rubber_duck",) if not default else tuple(default[:1])
    if spec.kind in ("floats", "ints"):
        first = default[0] if spec.kind == "ints" else default[0] * 1.01
        return (int(first) if spec.kind == "ints" else first, *default[1:])
    if spec.kind in ("int", "float"):
        lo = spec.lo if spec.lo is not None else 0
        hi = spec.hi if spec.hi is not None else lo + 100
        if default is None:
            value = lo + min((hi - lo) / 2, 0.5) if spec.kind == "float" else int(lo + 1)
            return value if not spec.lo_open or value != lo else value + 1
        if spec.pow2:
            return default * 2 if default * 2 <= hi else default // 2
        step = spec.multiple_of or 1
        if spec.kind == "float":
            step = max(abs(default) * 0.01, 1e-3)
        value = default + step if default + step <= hi else default - step
        if spec.kind == "float" and default == 0.0 and spec.hi is not None and spec.hi <= 1.0:
            value = 0.01
        return value
    raise AssertionError(f"no other value for a {spec.kind} setting")


def changed_settings() -> Iterator[tuple[str, Any, dict[str, str]]]:
    unions = _unions()
    for path, spec, default in leaf_paths(JobConfig):
        if path in NOT_GENERIC:
            continue
        head, _, rest = path.partition(".")
        kinds: dict[str, str] = {}
        if head in unions and rest == KIND_KEY:
            choices = [c for c in spec.choices if c != default]
            if head == "method":
                choices = [c for c in choices if c != "esd-exact"]  # esd-exact needs the reference prior: fine, it is the default
            yield path, choices[0], {}
            continue
        if head in unions:
            owner = owners(JobConfig, path)[0]
            kinds[head] = owner.KIND
            default = next(d for n, s, d in record_fields(owner) if n == rest)
        yield path, other_value(spec, default), kinds
