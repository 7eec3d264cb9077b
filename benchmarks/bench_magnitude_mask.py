"""magnitude_mask: fusion_engine vs the torch reference, mergekit and PEFT (where they have it), side by side.

Run: pytest benchmarks/bench_magnitude_mask.py   (benchmarks/report.py writes RESULTS.md from the same cases)
"""

from conftest import make_bench

test_magnitude_mask = make_bench("magnitude_mask")
