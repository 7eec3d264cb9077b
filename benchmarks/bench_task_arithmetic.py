"""task_arithmetic: fusion_engine vs the torch reference, mergekit and PEFT (where they have it), side by side.

Run: pytest benchmarks/bench_task_arithmetic.py   (benchmarks/report.py writes RESULTS.md from the same cases)
"""

from conftest import make_bench

test_task_arithmetic = make_bench("task_arithmetic")
