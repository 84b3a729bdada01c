"""actatlas: Activation Atlases (Carter et al., Distill 2019) for any PyTorch vision model.

Quick start::

    import actatlas as aa
    spec = aa.load_model("efficientnet_lite0")
    result = aa.collect(spec, aa.images("photos/"), out="runs/demo")
    run = aa.open_run("runs/demo")
    acts = run.activations(run.layers[0])        # [n, c], memory-mapped
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("actatlas")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

from .errors import UserError  # noqa: E402
from .models import ModelSpec, Preprocess, list_models, load_model  # noqa: E402
from .data import ImageSource, images  # noqa: E402
from .hooks import capture, list_layers  # noqa: E402
from .collect import CollectConfig, CollectResult, collect  # noqa: E402
from .run import Run, Rows, open_run  # noqa: E402
from .evaluate import EvalResult, evaluate  # noqa: E402
from .atlas import Atlas, open_atlas  # noqa: E402

__all__ = [
    "__version__", "UserError", "ModelSpec", "Preprocess", "list_models", "load_model", "ImageSource", "images",
    "capture", "list_layers", "CollectConfig", "CollectResult", "collect", "Run", "Rows", "open_run",
    "EvalResult", "evaluate", "Atlas", "open_atlas",
]
