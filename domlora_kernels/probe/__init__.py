"""The PAGE probe: per-sample projected adapter gradient energy inside one backward pass.

:func:`page_scores` is the entry point (:mod:`.api`); the rest of this package is its parts:
the autograd tap (:mod:`.tap`), the per-module sites (:mod:`.sites`), the shared-input cache
(:mod:`.shared`), merging across ranks (:mod:`.merge`), checks of the input (:mod:`.checks`),
the arithmetic per module (:mod:`.energies`, :mod:`.experts`), and what feeds it
(:mod:`.candidates`, :mod:`.losses`, :mod:`.packing`, :mod:`.frozen`).
"""

from .api import ESTIMATORS, PROJECTIONS, LossFn, page_scores

__all__ = ["page_scores", "PROJECTIONS", "ESTIMATORS", "LossFn"]
