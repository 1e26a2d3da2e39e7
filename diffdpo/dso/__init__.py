"""DSO: align a 3D generator with simulation feedback (Li et al. 2025, arXiv 2503.22677).

* :mod:`diffdpo.dso.generator`: the :class:`Generator3D` protocol and the ELBO proxy on its latents;
* :mod:`diffdpo.dso.data`: DPO pairs within groups (uniform groups dropped) and pointwise labels;
* :mod:`diffdpo.dso.task`: the :class:`diffdpo.task.PreferenceTask` the shared loop trains;
* :mod:`diffdpo.dso.evaluate`: sample -> mesh -> :func:`sim.score_meshes` -> stable rate, fidelity;
The multi-round loop is a recipe: :mod:`diffdpo.recipes.dso`.
"""

from diffdpo.dso.generator import Generator3D, generator_logps, load_generator, noise_samples

__all__ = ["Generator3D", "generator_logps", "load_generator", "noise_samples"]
