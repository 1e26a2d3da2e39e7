"""Studies: recipes that run many training jobs through the one loop and tabulate their evaluations."""
