"""fisher_merge: fusion_engine vs the torch reference, mergekit and PEFT (where they have it), side by side.

Run: pytest benchmarks/bench_fisher_merge.py   (benchmarks/report.py writes RESULTS.md from the same cases)
"""

from conftest import make_bench

test_fisher_merge = make_bench("fisher_merge")
