"""Scorers that play the labeller: the programmatic judge of the shapes world."""
