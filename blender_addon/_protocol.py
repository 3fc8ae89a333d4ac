"""The wire protocol, from wherever this copy of the add-on finds it.

Inside the built extension the protocol package is bundled as the ``protocol`` subpackage
(see scripts/build_extension.py) and imported relatively, as Blender's extension rules
require. Run from the source tree (tests, the batch script with plain ``python``), the add-on
has no bundled copy and uses the installed ``distill3d_protocol`` package instead: both are
the same source, shared/distill3d_protocol.
"""

from __future__ import annotations

try:
    from .protocol import (  # noqa: F401  (re-exported)
        PROTOCOL_VERSION,
        Kind,
        MeshPayload,
        Message,
        ProtocolError,
        decode,
        encode,
        image_from_message,
        mesh_from_message,
    )

    SOURCE = "bundled"
except ModuleNotFoundError as exc:  # only a missing bundled copy falls back, not a broken one
    if exc.name != f"{__package__}.protocol":
        raise
    from distill3d_protocol import (  # noqa: F401  (re-exported)
        PROTOCOL_VERSION,
        Kind,
        MeshPayload,
        Message,
        ProtocolError,
        decode,
        encode,
        image_from_message,
        mesh_from_message,
    )

    SOURCE = "distill3d_protocol"
