import pytest

from _cases import copy_bandwidth, make_case


@pytest.fixture(scope="session")
def copy_bytes_per_s():
    return copy_bandwidth()


_CACHE = {}


@pytest.fixture
def case_of():
    def get(op, dtype, K):
        key = (op, dtype, K)
        if key not in _CACHE:
            _CACHE.clear()  # one case's tensors in memory at a time
            _CACHE[key] = make_case(op, dtype, K)
        return _CACHE[key]
    return get


def run_case(benchmark, case, provider, copy_bytes_per_s):
    fn = case.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not available")
    slow = provider in ("mergekit", "peft", "torch-reference")
    benchmark.pedantic(fn, rounds=1 if slow else 5, iterations=1, warmup_rounds=0 if slow else 1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        op=case.op, dtype=str(case.dtype), K=case.K, floor_bytes=case.floor_bytes,
        gb_per_s=case.floor_bytes / seconds / 1e9,
        floor_ratio=seconds / (case.floor_bytes / copy_bytes_per_s),
        copy_gb_per_s=copy_bytes_per_s / 1e9,
    )


PROVIDERS = ("fusion_engine-cpp", "torch-reference", "mergekit", "peft")


def make_bench(op):
    """The pytest-benchmark test of one op: every provider × dtype × K, side by side."""
    from _cases import DTYPES, KS

    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("K", KS if op != "magnitude_mask" else (1,))
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def bench(benchmark, case_of, copy_bytes_per_s, dtype, K, provider):
        run_case(benchmark, case_of(op, dtype, K), provider, copy_bytes_per_s)

    return bench
