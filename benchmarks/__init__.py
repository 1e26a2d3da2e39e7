"""Side-by-side performance comparisons, one command each."""
