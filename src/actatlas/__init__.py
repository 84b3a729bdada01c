"""actatlas: Activation Atlases (Carter et al., Distill 2019) for any PyTorch vision model.

Quick start::

    import actatlas as aa
    atlas = aa.build_atlas("photos/", out="runs/demo", levels=(10, 20),
                           render=aa.RenderConfig.cpu_default(steps=64))
    aa.save_site(atlas, "runs/demo/site")       # the viewer as a static site; then: actatlas serve runs/demo/site
    aa.show(atlas)                              # in Jupyter: the interactive viewer

    aa.build_atlas(out="runs/demo", levels=(10, 20, 40))   # continue the same run, one more level

Lower down: ``aa.collect`` (activations + attributions into a run directory), ``aa.open_run``
(memory-mapped arrays and provenance), ``aa.load_model``, ``aa.images``; the stage functions live
in ``actatlas.pipeline`` and the analysis views in ``actatlas.analysis``.
"""

from .version import __version__
from .errors import (ActatlasError, ConfigError, DataError, ModelError, OutputPathError,  # noqa: E402
                     RunLockedError, RunStateError, UserError)
from .models import ModelSpec, Preprocess, list_models, load_model  # noqa: E402
from .data import ImageSource, images  # noqa: E402
from .hooks import capture, list_layers  # noqa: E402
from .runtime import Runtime, enable_numba_cache  # noqa: E402
from .collect import CollectConfig, CollectResult, collect  # noqa: E402
from .run import Run, Rows, open_run  # noqa: E402
from .evaluate import EvalResult, evaluate  # noqa: E402
from .layout import AlignConfig, LayoutConfig  # noqa: E402
from .render import RenderConfig  # noqa: E402
from .atlas import Atlas, AtlasSet, open_atlas  # noqa: E402
from .pipeline import BuildReport, build_atlas  # noqa: E402
from .export import AtlasView, export_atlases, export_site, save_site, show  # noqa: E402

__all__ = [
    "__version__", "build_atlas", "BuildReport", "Atlas", "AtlasSet", "open_atlas", "show", "AtlasView", "save_site",
    "export_site", "export_atlases", "LayoutConfig", "AlignConfig", "RenderConfig",
    "CollectConfig", "Runtime", "enable_numba_cache", "collect", "CollectResult", "open_run", "Run", "Rows",
    "load_model", "list_models", "ModelSpec", "Preprocess", "images", "ImageSource", "capture", "list_layers",
    "evaluate", "EvalResult", "UserError", "ActatlasError", "ConfigError", "DataError", "ModelError",
    "RunStateError", "RunLockedError", "OutputPathError",
]
