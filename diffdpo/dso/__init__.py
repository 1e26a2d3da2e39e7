"""DSO: align a 3D generator with simulation feedback (Li et al. 2025, arXiv 2503.22677).

* :mod:`diffdpo.dso.generator`: the :class:`Generator3D` protocol and the ELBO proxy on its latents;
* :mod:`diffdpo.dso.data`: DPO pairs within groups (uniform groups dropped) and pointwise labels;
* :mod:`diffdpo.dso.task`: the :class:`diffdpo.train.PreferenceTask` the shared loop trains;
* :mod:`diffdpo.dso.evaluate`: sample -> mesh -> :func:`sim.score_meshes` -> stable rate, fidelity;
* :mod:`diffdpo.dso.loop`: ``diffdpo dso``, R rounds with reports, plots and renders.
"""

from diffdpo.dso.generator import Generator3D, generator_logps, noise_samples

__all__ = ["Generator3D", "generator_logps", "noise_samples"]
