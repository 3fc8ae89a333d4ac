"""Render a result GLB in Blender (Cycles, from the ``bpy`` module) at a few angles, as an artist sees it.

The GLB is imported with Blender's glTF importer, welded at its UV seams (copies at one position
become one vertex, as the add-on's import does), shaded smooth, set on a floor with a sun and a
fill light, and rendered from ``--angles`` azimuths around it; the pictures are joined side by
side into one PNG. Used for the README's pictures::

    .venv/bin/python scripts/render_blender.py out/demo/result.glb --out docs/images/demo_blender.png
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("glb", type=Path, help="the result to render (result.glb of a job)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write (the angles side by side)")
    p.add_argument("--angles", type=int, default=4, help="azimuths, evenly spaced from the front (default 4)")
    p.add_argument("--size", type=int, default=320, help="pixels per picture (square)")
    p.add_argument("--samples", type=int, default=32, help="Cycles samples per pixel")
    p.add_argument("--elevation", type=float, default=20.0, help="camera elevation in degrees")
    return p


def setup_scene(bpy, glb: Path, size: int, samples: int):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    bpy.ops.import_scene.gltf(filepath=str(glb))
    objects = [o for o in scene.objects if o.type == "MESH"]
    if not objects:
        raise SystemExit(f"render_blender: {glb} holds no mesh")
    obj = objects[0]
    import bmesh

    bm = bmesh.new()
    bm.from_mesh(obj.data)
    bmesh.ops.remove_doubles(bm, verts=bm.verts, dist=0.0)  # weld the UV-seam copies
    bm.to_mesh(obj.data)
    bm.free()
    for poly in obj.data.polygons:
        poly.use_smooth = True
    # the floor, under the object's base (distill3d puts the origin there)
    lo = min(v.co.z for v in obj.data.vertices)
    bpy.ops.mesh.primitive_plane_add(size=20.0, location=(0.0, 0.0, lo))
    floor = bpy.context.active_object
    floor_material = bpy.data.materials.new("floor")
    floor_material.use_nodes = True
    floor_material.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.55, 0.55, 0.58, 1.0)
    floor.data.materials.append(floor_material)
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (math.radians(40), 0.0, math.radians(30))
    scene.collection.objects.link(sun)
    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.8, 0.85, 0.9, 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.6
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.film_transparent = False
    scene.view_settings.view_transform = "Standard"
    return scene, obj


def render_angles(bpy, scene, obj, angles: int, elevation: float) -> list[np.ndarray]:
    from mathutils import Vector

    verts = np.array([v.co[:] for v in obj.data.vertices])
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    centre = Vector(((lo + hi) / 2).tolist())
    radius = float(np.linalg.norm(hi - lo)) * 1.35
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.lens = 50.0
    scene.collection.objects.link(camera)
    scene.camera = camera
    pictures = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(angles):
            azimuth = 2 * math.pi * i / angles  # 0 = the front (-Y)
            el = math.radians(elevation)
            offset = Vector((math.sin(azimuth) * math.cos(el), -math.cos(azimuth) * math.cos(el), math.sin(el))) * radius
            camera.location = centre + offset
            camera.rotation_euler = (centre - camera.location).to_track_quat("-Z", "Y").to_euler()
            path = Path(tmp) / f"view{i}.png"
            scene.render.filepath = str(path)
            bpy.ops.render.render(write_still=True)
            from PIL import Image

            pictures.append(np.asarray(Image.open(path).convert("RGB")))
    return pictures


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import bpy
    from PIL import Image

    scene, obj = setup_scene(bpy, args.glb, args.size, args.samples)
    pictures = render_angles(bpy, scene, obj, args.angles, args.elevation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(pictures, axis=1)).save(args.out)
    print(f"wrote {args.out} ({args.angles} views, {len(obj.data.vertices)} welded vertices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
