"""The wire protocol and the job description, from wherever this copy of the add-on finds them.

Inside the built extension the protocol package is bundled as the ``protocol`` subpackage
(see scripts/build_extension.py) and imported relatively, as Blender's extension rules
require. Run from the source tree (tests, the batch script with plain ``python``), the add-on
has no bundled copy and uses the installed ``distill3d_protocol`` package instead: both are
the same source, shared/distill3d_protocol.

Besides the wire (encode/decode, meshes) this re-exports the job description the panel is
generated from: ``jobconfig`` (JobConfig, the METHODS/PRIORS/FIELDS/CAMERAS registries, parse_job,
migrate) and ``records`` (the typed-settings machinery of ``settings.py``: Setting,
leaf_paths, owners, check_value, ...; renamed here because "settings" means the panel's
PropertyGroup everywhere else in the add-on).
"""

from __future__ import annotations

import importlib

try:
    _package = importlib.import_module(f"{__package__}.protocol")
    SOURCE = "bundled"
except ModuleNotFoundError as exc:  # only a missing bundled copy falls back, not a broken one
    if exc.name != f"{__package__}.protocol":
        raise
    _package = importlib.import_module("distill3d_protocol")
    SOURCE = "distill3d_protocol"

jobconfig = importlib.import_module(f"{_package.__name__}.jobconfig")
records = importlib.import_module(f"{_package.__name__}.settings")
recipes = importlib.import_module(f"{_package.__name__}.recipes")  # measured defaults per prior, presets

# the wire
PROTOCOL_VERSION = _package.PROTOCOL_VERSION
Kind = _package.Kind
MeshPayload = _package.MeshPayload
Message = _package.Message
ProtocolError = _package.ProtocolError
decode = _package.decode
encode = _package.encode
image_from_message = _package.image_from_message
weld = _package.weld
MAX_ARRAY_BYTES = _package.MAX_ARRAY_BYTES
mesh_from_message = _package.mesh_from_message

# the job description
ConfigError = _package.ConfigError
CONFIG_VERSION = jobconfig.CONFIG_VERSION
JobConfig = jobconfig.JobConfig
METHODS = jobconfig.METHODS
PRIORS = jobconfig.PRIORS
FIELDS = jobconfig.FIELDS
CAMERAS = jobconfig.CAMERAS
parse_job = jobconfig.parse_job
migrate = jobconfig.migrate
