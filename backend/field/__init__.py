"""Radiance fields (density + albedo over ``[-bound, bound]^3``) and backgrounds.

``make_field("dense", resolution=64)`` gives the CPU field (a dense voxel grid),
``make_field("hash")`` the GPU default (a multi-resolution hash grid); both implement
:class:`RadianceField`. :data:`FIELD_CLASSES` maps each record of the job description's
``FIELDS`` registry to its implementation; options are that record's fields, unknown ones
raise :class:`FieldError`.
"""

from __future__ import annotations

from distill3d_protocol.jobconfig import FIELDS

from .background import BACKGROUND_KINDS, Background
from .base import FieldConfig, FieldError, FieldOutput, RadianceField, trunc_exp
from .dense import DenseGridConfig, DenseGridField
from .hash import HashEncoding, HashGridConfig, HashGridField

#: the implementation of each field record, by the record's kind
FIELD_CLASSES: dict[str, type[RadianceField]] = {cls.config_class.KIND: cls for cls in (DenseGridField, HashGridField)}
FIELD_KINDS = FIELDS.names


def make_field(kind: str, **options) -> RadianceField:
    """A new field of ``kind`` (a name of ``FIELDS``) built from keyword ``options``."""
    if kind not in FIELD_CLASSES:
        raise FieldError(f"field kind must be one of {', '.join(FIELD_KINDS)}; got {kind!r}")
    return FIELD_CLASSES[kind](**options)


def field_from_config(config) -> RadianceField:
    """The field a job's ``field`` record describes."""
    return FIELD_CLASSES[type(config).KIND](config)


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
    "FIELD_CLASSES",
    "field_from_config",
    "make_field",
    "trunc_exp",
]
