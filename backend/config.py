"""The job configuration as the backend uses it: the protocol's one description
(:mod:`distill3d_protocol.jobconfig`), plus the camera check that needs the backend's maths.

:func:`parse_job` is the edge: the CLI, the server (once, at submit), the benchmark and the
batch script call it; everything after it trusts the typed :class:`JobConfig` it returns.
"""

from __future__ import annotations

from typing import Any

from distill3d_protocol import jobconfig as _spec
from distill3d_protocol.errors import ConfigError, Distill3DError
from distill3d_protocol.jobconfig import (
    CAMERAS,
    CONFIG_VERSION,
    DEFAULT_DEPTH_MODEL,
    CameraDistributionConfig,
    CameraRigConfig,
    DEFAULT_SD_MODEL,
    FIELDS,
    METHODS,
    PRIORS,
    DenseFieldConfig,
    ESDConfig,
    ESDExactConfig,
    ESDKernelConfig,
    ExportConfig,
    LAM_HELP,
    HashFieldConfig,
    JobConfig,
    LearnedPriorConfig,
    LearnedScoreConfig,
    MethodConfig,
    OptimConfig,
    PreviewConfig,
    ReferencePriorConfig,
    RendererConfig,
    ScheduleConfig,
    SDPriorConfig,
    SDSConfig,
    SSDConfig,
    VSDConfig,
    job_schema,
    migrate,
)
from distill3d_protocol.settings import build, leaf_paths, record_fields, set_path, to_dict

from .cameras import CameraError, camera_source_from_dict

__all__ = [
    "CAMERAS", "CONFIG_VERSION", "CameraDistributionConfig", "CameraRigConfig", "LAM_HELP", "DEFAULT_DEPTH_MODEL", "DEFAULT_SD_MODEL", "FIELDS", "METHODS", "PRIORS", "ConfigError",
    "DenseFieldConfig", "Distill3DError", "ESDConfig", "ESDExactConfig", "ESDKernelConfig", "ExportConfig", "HashFieldConfig", "JobConfig",
    "LearnedPriorConfig", "LearnedScoreConfig", "MethodConfig", "OptimConfig", "PreviewConfig", "ReferencePriorConfig", "RendererConfig",
    "SDPriorConfig", "SDSConfig", "SSDConfig", "ScheduleConfig", "VSDConfig", "build", "job_schema", "leaf_paths",
    "migrate", "parse_job", "set_path", "to_dict", "union_sections", "with_overrides",
]


def parse_job(data: Any) -> JobConfig:
    """A validated job from its JSON form (any version) or a :class:`JobConfig`."""
    config = _spec.parse_job(data)
    if config.cameras is not None:
        try:  # what needs the camera maths: affine, non-singular rig matrices
            camera_source_from_dict(to_dict(config.cameras))
        except CameraError as exc:
            raise ConfigError(f"cameras: {exc}") from None
    return config


def union_sections() -> frozenset[str]:
    """The job's sections that are one of several records (``prior``, ``method``, ``field``, ``cameras``)."""
    return frozenset(name for name, spec, _ in record_fields(JobConfig) if getattr(spec, "registry", None) is not None)


def with_overrides(config: JobConfig | dict, overrides: dict[str, Any]) -> JobConfig:
    """``config`` with dotted-path values replaced (``{"method.lam": 0.5}``), validated.

    Setting a union's ``kind`` (``method.kind``) to another kind starts that section from the
    new kind's defaults, keeping nothing of the old one; ``{"field": None}`` sets a whole value."""
    data = to_dict(config) if isinstance(config, JobConfig) else migrate(dict(config))
    unions = union_sections()
    for path, value in overrides.items():
        section_name, _, leaf = path.partition(".")
        if section_name in unions and leaf == "kind":
            current = data.get(section_name)
            if not isinstance(current, dict) or current.get("kind") != value:
                data[section_name] = {"kind": value}
    for path, value in overrides.items():
        section_name, _, leaf = path.partition(".")
        if not (section_name in unions and leaf == "kind"):
            set_path(data, path, value)
    return parse_job(data)
