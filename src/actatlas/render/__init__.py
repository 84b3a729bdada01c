"""Feature visualization of atlas cells: icons (method.md §1.8-1.11).

- `params`: FFT image parameterization with colour decorrelation (`FFTImage`, §1.10).
- `transforms`: robustness transforms as nn.Modules with seeded draws (`recipe_transforms`, §1.11).
- `objectives`: the Lucid-style objective algebra (`direction_cossim`, `boundary_penalty`, §1.9).
- `optimize`: the one optimisation loop (`optimize`, Adam lr 0.05, runs the net only to the layer).
- `redirect`: Lucid's redirected ReLU gradient as a temporary swap of ReLU modules (`redirected_relu`).
- `icons`: batched best-of-N icon rendering and the fidelity score (`render_icons`, `RenderConfig`).

Example::

    from actatlas.render import RenderConfig, render_icons
    icons = render_icons(spec, "blocks.8", cell_means, RenderConfig.cpu_default(), S=S)
    icons.images      # uint8 [m, 64, 64, 3]
    icons.fidelity    # [m] cos(icon centre activation, v @ S)
"""

from ._forward import forward_to_layers, model_input, warmup
from .icons import (IconSet, RenderConfig, centre_activations, fidelity_of_activations, icon_fidelity,
                    render_icons)
from .objectives import (Objective, RenderContext, as_objective, blur5, boundary_penalty, channel, direction,
                         direction_cossim, neuron, target_vectors)
from .optimize import OptimResult, evaluate_objective, optimize
from .params import FFTImage, collapse_alpha, color_correlation_matrix, spectrum_scale
from .redirect import REDIRECT_STEPS, RedirectedReLU, redirected_relu, redirected_relu_grad, uses_redirected_relu
from .transforms import (NOTEBOOK_SCALES, RECIPE_ANGLES, RECIPE_SCALES, Compose, CropOrPadTo, Jitter, Pad,
                         RandomRotate, RandomScale, Transform, make_transforms, notebook_transforms,
                         recipe_transforms)

__all__ = [
    "FFTImage", "spectrum_scale", "color_correlation_matrix", "collapse_alpha",
    "Transform", "Pad", "Jitter", "RandomScale", "RandomRotate", "CropOrPadTo", "Compose",
    "RECIPE_SCALES", "NOTEBOOK_SCALES", "RECIPE_ANGLES", "recipe_transforms", "notebook_transforms",
    "make_transforms",
    "RenderContext", "Objective", "as_objective", "direction", "direction_cossim", "channel", "neuron",
    "boundary_penalty", "blur5", "target_vectors",
    "OptimResult", "optimize", "evaluate_objective",
    "REDIRECT_STEPS", "RedirectedReLU", "redirected_relu", "redirected_relu_grad", "uses_redirected_relu",
    "RenderConfig", "IconSet", "render_icons", "fidelity_of_activations", "icon_fidelity", "centre_activations",
    "forward_to_layers", "model_input", "warmup",
]
