"""Training-free IndexCache: greedy layer search (Algorithm 1), its baselines, and the search job. All of it
runs through a layer runner (:mod:`indexcache.runner`)."""

from ..distributed import Dist
from ..errors import SearchError
from .evaluator import LossEvaluator, lm_loss
from .greedy import GreedyResult, Step, estimate_layer_forwards, greedy_search, layer_forward_counts, stage_starts
from .similarity import similarity_dp, similarity_matrix, similarity_score

__all__ = [
    "estimate_layer_forwards",
    "layer_forward_counts",
    "Dist",
    "GreedyResult",
    "LossEvaluator",
    "SearchError",
    "Step",
    "greedy_search",
    "lm_loss",
    "similarity_dp",
    "similarity_matrix",
    "similarity_score",
    "stage_starts",
]
