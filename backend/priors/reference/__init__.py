"""The reference world: built-in procedural objects and the exact diffusion prior of their views.

* :mod:`.objects` - the objects (SDF + albedo, front toward -Y), prompt keywords
* :mod:`.render` - batched sphere tracer (rgb, alpha, depth) on :data:`BACKGROUND_COLOR`
* :mod:`.collection` - front-biased reference collections, cached on disk
* :mod:`.mixture` - closed-form noise prediction of a diffused image collection
* :mod:`.prior` - :class:`ReferencePrior` (the Prior interface), exact posterior-mean depth
* :mod:`.classifiers` - calibrated kernel classifiers p(azimuth bin | image), p(object | image)
* :mod:`.mesh` - ground-truth meshes (marching cubes) for Chamfer distance and GLB export
"""

from .classifiers import AZIMUTH_BIN_NAMES, CLASSIFIER_RESOLUTION, KernelClassifier, ReferenceClassifiers, classifier_features, entropy
from .collection import (
    DEFAULT_ELEVATION_RANGE,
    DEFAULT_FOV,
    DEFAULT_KAPPA,
    DEFAULT_NUM_VIEWS,
    DEFAULT_RADIUS,
    KAPPA_PRESETS,
    NUM_AZIMUTH_BINS,
    CollectionSpec,
    ReferenceCollection,
    azimuth_bin,
    cache_path,
    load_collection,
    resolve_cache_dir,
    resolve_kappa,
)
from .mesh import export_ground_truth, ground_truth_colored_mesh, ground_truth_mesh
from .mixture import mixture_eps, mixture_log_density, mixture_logits, mixture_responsibilities
from .objects import OBJECTS, ReferenceObject, find_objects_in_text, get_object, object_names
from .prior import ReferencePrior, ReferencePromptData
from .render import BACKGROUND_COLOR, RENDERER_VERSION, RenderError, image_grid, render_object

__all__ = [
    "AZIMUTH_BIN_NAMES", "BACKGROUND_COLOR", "CLASSIFIER_RESOLUTION", "CollectionSpec", "DEFAULT_ELEVATION_RANGE",
    "DEFAULT_FOV", "DEFAULT_KAPPA", "DEFAULT_NUM_VIEWS", "DEFAULT_RADIUS", "KAPPA_PRESETS", "KernelClassifier",
    "NUM_AZIMUTH_BINS", "OBJECTS", "RENDERER_VERSION", "ReferenceClassifiers", "ReferenceCollection", "ReferenceObject",
    "ReferencePrior", "ReferencePromptData", "RenderError", "azimuth_bin", "cache_path", "classifier_features",
    "entropy", "export_ground_truth", "find_objects_in_text", "get_object", "ground_truth_colored_mesh",
    "ground_truth_mesh", "image_grid", "load_collection", "mixture_eps", "mixture_log_density", "mixture_logits",
    "mixture_responsibilities", "object_names", "render_object", "resolve_cache_dir", "resolve_kappa",
]
