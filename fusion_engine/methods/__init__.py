"""Merge methods built from the ops, with mergekit-compatible names, parameters and defaults (issue 4)."""
