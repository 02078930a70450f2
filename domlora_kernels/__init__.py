"""domlora_kernels: find the dominant adaptation module of a model with PAGE, and put a LoRA there.

>>> from domlora_kernels import page_scores
>>> scores = page_scores(model, batches, rank=8)   # doctest: +SKIP
>>> scores.dominant_module                         # doctest: +SKIP
"""

from .probe import PROJECTIONS, ESTIMATORS, page_scores
from .scores import PageScores

__all__ = ["page_scores", "PageScores", "PROJECTIONS", "ESTIMATORS"]
__version__ = "0.1.0"
