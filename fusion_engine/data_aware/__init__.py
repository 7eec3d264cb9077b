"""Data-aware fusion: Fisher estimation, RegMean, AdaMerging (issue 5)."""
