"""Radiance fields (density + albedo over ``[-bound, bound]^3``) and backgrounds.

``make_field("dense", resolution=64)`` gives the CPU field (a dense voxel grid),
``make_field("hash")`` the GPU default (a multi-resolution hash grid); both implement
:class:`RadianceField`. Options are the fields of :class:`DenseGridConfig` /
:class:`HashGridConfig` (shared ones in :class:`FieldConfig`); unknown options raise
:class:`FieldError`.
"""

from __future__ import annotations

from .background import BACKGROUND_KINDS, Background
from .base import FieldConfig, FieldError, FieldOutput, RadianceField, trunc_exp
from .dense import DenseGridConfig, DenseGridField
from .hash import HashEncoding, HashGridConfig, HashGridField

FIELD_KINDS = ("dense", "hash")


def make_field(kind: str, **options) -> RadianceField:
    """A new field of ``kind`` ("dense" | "hash") built from keyword ``options``."""
    if kind == "dense":
        return DenseGridField(**options)
    if kind == "hash":
        return HashGridField(**options)
    raise FieldError(f"field kind must be one of {', '.join(FIELD_KINDS)}; got {kind!r}")


__all__ = [
    "BACKGROUND_KINDS",
    "Background",
    "DenseGridConfig",
    "DenseGridField",
    "FIELD_KINDS",
    "FieldConfig",
    "FieldError",
    "FieldOutput",
    "HashEncoding",
    "HashGridConfig",
    "HashGridField",
    "RadianceField",
    "make_field",
    "trunc_exp",
]
