"""Placement: which modules get an adapter, at which rank, and the peft adapter put there.

:mod:`.budget` and :mod:`.plan` are pure planning (top-k, rank patterns, a parameter budget
turned into a plan); :mod:`.strategies` ranks modules by other signals than PAGE, which :mod:`.signals`
measures; :mod:`.wiring` is the peft side (the config, the wrapped model, the
probe's A copied into ``lora_A``).
"""

from .budget import parse_budget
from .plan import VARIANTS, Placement, exact_names_regex, page_rank_pattern, top_modules
from .signals import measure_signals
from .strategies import COSTS, STRATEGIES
from .wiring import apply_domlora, domlora_config

__all__ = ["VARIANTS", "Placement", "apply_domlora", "domlora_config", "exact_names_regex", "page_rank_pattern",
           "top_modules", "parse_budget", "measure_signals", "STRATEGIES", "COSTS"]
