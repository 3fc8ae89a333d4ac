"""Scene cameras as a distill3d camera rig.

Each perspective camera object becomes one rig entry ``{"matrix": [16 floats], "fov": deg}``:
``matrix`` is the object's ``matrix_world`` flattened row-major (a Blender camera looks down
its local -Z with +Y up, exactly the backend's camera-to-world convention) and ``fov`` is the
vertical field of view of the rendered image in degrees, which depends on the lens, the
sensor size, the sensor fit and the render aspect ratio.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def render_aspect(scene: Any) -> tuple[float, float]:
    """Width and height of the rendered frame in pixel-aspect-corrected units."""
    render = scene.render
    width = float(render.resolution_x) * float(render.pixel_aspect_x)
    height = float(render.resolution_y) * float(render.pixel_aspect_y)
    if width <= 0 or height <= 0:
        return 1.0, 1.0
    return width, height


def vertical_fov_degrees(
    lens_mm: float,
    sensor_width_mm: float,
    sensor_height_mm: float,
    sensor_fit: str,
    width: float,
    height: float,
) -> float:
    """Vertical field of view (degrees) of a perspective camera.

    ``sensor_fit`` follows Blender: AUTO fits ``sensor_width`` to the larger image side,
    HORIZONTAL fits ``sensor_width`` to the width, VERTICAL fits ``sensor_height`` to the height.
    """
    if lens_mm <= 0:
        raise ValueError(f"camera focal length must be positive, got {lens_mm}")
    if sensor_fit == "AUTO":
        sensor_fit = "HORIZONTAL" if width >= height else "VERTICAL"
        sensor_height_mm = sensor_width_mm  # AUTO uses the width setting for either side
    if sensor_fit == "HORIZONTAL":
        half_h = math.atan(sensor_width_mm / (2.0 * lens_mm))
        return math.degrees(2.0 * math.atan(math.tan(half_h) * height / width))
    if sensor_fit == "VERTICAL":
        return math.degrees(2.0 * math.atan(sensor_height_mm / (2.0 * lens_mm)))
    raise ValueError(f"unknown sensor fit {sensor_fit!r} (expected AUTO, HORIZONTAL or VERTICAL)")


def camera_vertical_fov(camera_object: Any, scene: Any) -> float:
    """Vertical fov in degrees of a camera object rendered with ``scene``'s resolution."""
    cam = camera_object.data
    if cam.type != "PERSP":
        raise ValueError(f"camera {camera_object.name!r} is {cam.type.lower()}, only perspective cameras can be used")
    width, height = render_aspect(scene)
    return vertical_fov_degrees(cam.lens, cam.sensor_width, cam.sensor_height, cam.sensor_fit, width, height)


def camera_objects(scene: Any, collection: Any = None) -> list[Any]:
    """Camera objects of ``collection`` (recursively) or of the whole scene, sorted by name."""
    source: Iterable[Any] = collection.all_objects if collection is not None else scene.objects
    return sorted((o for o in source if o.type == "CAMERA"), key=lambda o: o.name)


def rig_entry(camera_object: Any, scene: Any) -> dict[str, Any]:
    """One rig entry for a camera object: world matrix (row-major) and vertical fov."""
    matrix = camera_object.matrix_world
    flat = [float(matrix[r][c]) for r in range(4) for c in range(4)]
    return {"matrix": flat, "fov": camera_vertical_fov(camera_object, scene)}


def scene_camera_rig(scene: Any, collection: Any = None) -> tuple[dict[str, Any], list[str]]:
    """The rig dict the backend accepts, plus a list of cameras that were skipped (and why).

    Raises ``ValueError`` when no usable camera is found.
    """
    cameras, skipped = [], []
    for obj in camera_objects(scene, collection):
        try:
            cameras.append(rig_entry(obj, scene))
        except ValueError as exc:
            skipped.append(str(exc))
    if not cameras:
        where = f"collection {collection.name!r}" if collection is not None else "the scene"
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"no perspective camera in {where}{detail}")
    return {"kind": "rig", "cameras": cameras}, skipped
