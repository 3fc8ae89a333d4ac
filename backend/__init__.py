"""distill3d: text-to-3D by score distillation (SDS, VSD, ESD, SSD) for Blender."""

__version__ = "0.1.0"
