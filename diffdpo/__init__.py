"""diffdpo."""
