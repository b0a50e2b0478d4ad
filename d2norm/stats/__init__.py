"""Population-statistics math, the one implementation behind the hooks, the tools and the tests: functions of a
model and data, no file I/O.

* :mod:`.estimators` — eq 2 / eq 3 of rethinking A.2 from per-batch moments, a count-weighted all-reducible
  moment accumulator;
* :mod:`.adapters`   — which statistics each norm layer holds and how to recompute / write them;
* :mod:`.state`      — snapshot / restore of everything a forward must not change (rethinking A.10);
* :mod:`.passes`     — what every statistics pass shares: unwrapping, re-batching, RNG / event-storage isolation;
* :mod:`.precise_bn` — :func:`recompute_population_stats` (PreciseBN, rethinking §3.2, A.3);
* :mod:`.esm`        — estimation shift magnitude (estimation-shift Def 2);
* :mod:`.probe`      — expected statistics of a test set (Def 1) and rethinking Fig 2 batch statistics;
* :mod:`.monitor`    — EMA vs batch / population gaps for the BN-statistics monitor hook;
* :mod:`.evalnorm_fit` — offline α̂, β̂ of EvalNorm (evalnorm §3.4) on a trained model.
"""
from .estimators import (
    ESTIMATORS,
    MomentAccumulator,
    PopulationEstimate,
    all_reduce_accumulators_,
    batch_moments,
    check_estimator,
    mean_of_batch_var_estimate,
    population_estimate,
)
from ..layers.protocol import get_stats_adapter
from .adapters import StatsAdapter
from .state import capture_state, restore_state
from .precise_bn import (
    NONFINITE_POLICIES,
    NonFiniteStatsError,
    PreciseBNResults,
    population_stat_layers,
    rank_share,
    recompute_population_stats,
)
from .esm import estimation_shift_magnitude, layer_esm, model_layer_esm
from .probe import batch_statistics, expected_population_stats
from .monitor import bn_statistics_gaps
from .evalnorm_fit import fit_evalnorm_offline

__all__ = [
    "ESTIMATORS", "MomentAccumulator", "PopulationEstimate", "all_reduce_accumulators_", "batch_moments",
    "check_estimator", "mean_of_batch_var_estimate", "population_estimate", "StatsAdapter", "get_stats_adapter",
    "capture_state", "restore_state", "NONFINITE_POLICIES", "NonFiniteStatsError", "PreciseBNResults",
    "population_stat_layers", "rank_share", "recompute_population_stats", "estimation_shift_magnitude", "layer_esm",
    "model_layer_esm", "batch_statistics", "expected_population_stats", "bn_statistics_gaps", "fit_evalnorm_offline",
]
