"""Recipes: what composes the library into runs (the shapes-world demo, the DSO rounds).

The library (losses, the loop, tasks, modalities, evaluation) never imports a recipe.

* :mod:`diffdpo.recipes.demo`: ``diffdpo demo``, Diffusion-DPO end to end on the shapes world;
* :mod:`diffdpo.recipes.dso`: ``diffdpo dso``, rounds of sample -> simulate -> fine-tune of a 3D generator.
"""
