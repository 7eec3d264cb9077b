"""Alignment: permutation specs, weight/activation matching, OT fusion, ZipIt (issue 3)."""
