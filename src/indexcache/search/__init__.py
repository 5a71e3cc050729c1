"""Training-free IndexCache: greedy layer search (Algorithm 1), its baselines, and the search job."""

from .evaluator import LossEvaluator
from .greedy import Dist, GreedyResult, SearchError, greedy_search, stage_starts
from .similarity import similarity_dp, similarity_matrix, similarity_score

__all__ = [
    "Dist",
    "GreedyResult",
    "LossEvaluator",
    "SearchError",
    "greedy_search",
    "similarity_dp",
    "similarity_matrix",
    "similarity_score",
    "stage_starts",
]
