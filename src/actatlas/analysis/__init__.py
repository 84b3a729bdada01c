"""What atlases are for (method.md §3.2, §3.3, §4): class atlases, two-class comparisons, patch attacks.

Pure functions over arrays plus small dataclasses here; rendering and result folders in
``actatlas.analysis.views`` (class atlases, comparisons) and ``actatlas.analysis.attack`` (patches,
patch attacks, patch discovery); the CLI wiring in ``actatlas.cli.views`` / ``actatlas.cli.patches``.
"""

from .classes import ClassAtlas, class_atlas, class_filter
from .compare import (Candidate, Comparison, candidate_cells, cell_sides, compare, comparison_axis,
                      embed_1d)
from .patches import (CORNERS, PatchAttackResult, composite, evaluate_patch, noise_patch, patch_attack,
                      save_report, success_chart)

__all__ = [
    "ClassAtlas", "class_atlas", "class_filter",
    "Candidate", "Comparison", "candidate_cells", "cell_sides", "compare", "comparison_axis", "embed_1d",
    "CORNERS", "PatchAttackResult", "composite", "evaluate_patch", "noise_patch", "patch_attack",
    "save_report", "success_chart",
]
