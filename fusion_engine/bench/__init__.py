"""Evaluation on real data (scikit-learn digits): shared models, the FusionBench-style table (issue 5)."""
