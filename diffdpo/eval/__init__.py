"""Evaluation: win rates with confidence intervals, image grids and training curves."""
