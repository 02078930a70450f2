"""domlora_kernels: find the dominant adaptation module of a model with PAGE, and put a LoRA there.

>>> from domlora_kernels import page_scores
>>> scores = page_scores(model, batches, rank=8)   # doctest: +SKIP
>>> scores.dominant_module                         # doctest: +SKIP
"""

from .probe import PROJECTIONS, ESTIMATORS, page_scores
from .probe.stopping import StopRule
from .errors import MissingExtraError
from .scores import PageScores

# these modules import peft / matplotlib inside the functions that need them, so importing them here is cheap
from .confidence import Confidence, confidence
from .placement import (STRATEGIES, VARIANTS, Placement, apply_domlora, domlora_config, measure_signals,
                        parse_budget)
from .report import Comparison, compare, plot_heatmap, plot_top, text_report

__all__ = [
    "page_scores", "PageScores", "PROJECTIONS", "ESTIMATORS", "StopRule",
    "domlora_config", "apply_domlora", "Placement", "VARIANTS", "parse_budget", "measure_signals", "STRATEGIES",
    "confidence", "Confidence", "compare", "Comparison", "plot_heatmap", "plot_top", "text_report",
    "MissingExtraError",
]
__version__ = "0.1.0"
