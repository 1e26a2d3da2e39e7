"""The DSO recipe (Li et al. 2025, arXiv 2503.22677, run for several rounds): ``diffdpo dso``.

* :mod:`~diffdpo.recipes.dso.config`: :class:`DSOConfig`;
* :mod:`~diffdpo.recipes.dso.seeds`: every seed of a run, from one layout with disjoint blocks;
* :mod:`~diffdpo.recipes.dso.rounds`: a round's training data (labels, pairs, rescue, regulariser);
* :mod:`~diffdpo.recipes.dso.validation`: keep, shorten or revert a round's update;
* :mod:`~diffdpo.recipes.dso.report`: scores, renders, plots and the table;
* :mod:`~diffdpo.recipes.dso.loop`: the rounds (:func:`run_dso`).
"""

from diffdpo.recipes.dso.config import DSOConfig
from diffdpo.recipes.dso.loop import run_dso

__all__ = ["DSOConfig", "run_dso"]
