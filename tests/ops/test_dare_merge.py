"""dare_merge: every usable backend against the torch reference over every switch; the random masks
bit-identical across backends, chunkings (offset=) and thread counts; keep rate; stream independence."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import dare_merge, stream_id, task_arithmetic
from fusion_engine.ops.philox import keep_mask
from utils import (draw_task_merge, LAYOUTS, as_list, assert_bitwise_equal, assert_verbose_allclose, check_call,
                   densities_for, device_for, dtypes_for, make_inputs, shapes_for, skip_unless_kernel, tolerance,
                   with_layout)

OP = "dare_merge"

SWITCHES = dict(consensus=(None, "sum", "count"), sign_on=("weighted", "unweighted"), divisor=("weights", "count"),
                rescale=(None, "density", "l1"), normalize=(False, True))

seeds = st.one_of(st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**64 - 1]), st.integers(0, 2**64 - 1))
streams = st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
# offsets: 0, odd ones, and around 2^34 where the high word of the Philox counter (q = j // 4) turns over
offsets = st.one_of(st.sampled_from([0, 1, 3, 1025, 2**34 - 4099, 2**34 - 3, 2**40 + 5]), st.integers(0, 2**45))


def _scale(inputs, weights, density, kw):
    k = len(inputs.tensors)
    w = [abs(v) for v in as_list(weights, k, 1.0)]
    rho = [d for d in as_list(density, k, 1.0) if d >= 2.0**-32]
    rescale = max((1.0 / r for r in rho), default=1.0) if kw.get("rescale", "density") else 1.0
    if kw.get("rescale") == "l1":
        rescale = max(rescale, max(1, inputs.base.numel()))  # a random mask may keep one tiny entry
    normalize = 1.0
    if kw.get("normalize", False) and kw.get("divisor", "weights") == "weights":
        normalize = max([8.0] + [1.0 / v for v in w if v > 0])
    return inputs.scale() * (1.0 + 2.0 * abs(kw.get("lam", 1.0)) * rescale * normalize * sum(w))


@given(data=st.data())
def test_matches_reference(backend, data):
    inputs, weights, density, kw = draw_task_merge(data, backend, SWITCHES)
    kw.update(seed=data.draw(seeds), stream=data.draw(streams), offset=data.draw(offsets))
    out_dtype = data.draw(st.sampled_from([None, *dtypes_for(backend)]))
    check_call(dare_merge, (inputs.base, inputs.tensors, weights, density), dict(kw, out_dtype=out_dtype), backend,
               inputs.named, scale=_scale(inputs, weights, density, kw), expected_dtype=out_dtype or inputs.dtype)


def test_every_switch(backend):
    """All 72 combinations of consensus, sign_on, divisor, rescale and normalize, with negative weights and
    per-model densities (0 and 1 included)."""
    shape = (7, 13) if backend == "triton" and device_for(backend).type == "cpu" else (33, 65)
    inputs = make_inputs(shape, torch.float32, 4, kind="normal", seed=31, layouts=LAYOUTS[:4] + ("contiguous",),
                         device=device_for(backend))
    weights, density = [1.0, -0.5, 0.75, 0.25], [0.3, 0.5, 1.0, 0.0]
    for values in itertools.product(*SWITCHES.values()):
        kw = dict(zip(SWITCHES, values), seed=7, stream=11)
        check_call(dare_merge, (inputs.base, inputs.tensors, weights, density), kw, backend, inputs.named,
                   scale=_scale(inputs, weights, density, kw), expected_dtype=torch.float32, repeat=False)



# ----------------------------------------------------------------------------------------------
# the masks themselves


def mask_probe(backend, n_or_shape, dtype, densities, *, seed, stream, offset, layout="contiguous"):
    """With base 0, x_i = 2^i (all ones scaled), no rescale, λ = 1, unit weights and no consensus,
    the output is Σ_i 2^i m_i: every model's mask, exactly, in every dtype."""
    device = device_for(backend)
    shape = (n_or_shape,) if isinstance(n_or_shape, int) else tuple(n_or_shape)
    xs = [with_layout(torch.full(shape, 2.0**i, dtype=dtype, device=device), layout) for i in range(len(densities))]
    return dare_merge(torch.zeros(shape, dtype=dtype, device=device), xs, None, densities, seed=seed, stream=stream,
                      offset=offset, rescale=None, backend=backend)


def expected_probe(shape, dtype, densities, *, seed, stream, offset):
    n = 1
    for s in shape:
        n *= s
    total = torch.zeros(n, dtype=torch.float64)
    for i, rho in enumerate(densities):
        total += 2.0**i * keep_mask(n, rho, seed=seed, stream=stream, model=i, offset=offset).double()
    return total.to(dtype).view(shape)


@given(data=st.data())
def test_masks_exact(backend, data):
    """The kept entries are exactly those of the Philox spec (fusion_engine.ops.philox.keep_mask), on
    every backend: any shape, dtype, layout, K, per-model density, seed, stream and offset."""
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    shape = data.draw(st.sampled_from(shapes_for(backend)))
    k = data.draw(st.integers(1, 4))
    densities = as_list(data.draw(densities_for(k)), k, 1.0)
    kw = dict(seed=data.draw(seeds), stream=data.draw(streams), offset=data.draw(offsets))
    layout = data.draw(st.sampled_from(LAYOUTS))
    y = mask_probe(backend, shape, dtype, densities, layout=layout, **kw)
    assert_bitwise_equal(y.cpu(), expected_probe(shape, dtype, densities, **kw), f"{backend}: DARE masks")


def _pieces(n, cuts):
    points = sorted({0, n, *[c for c in cuts if 0 < c < n]})
    return list(zip(points[:-1], points[1:]))


@given(data=st.data())
def test_chunking(backend, data):
    """Merging a tensor whole equals merging it in pieces with offset=: masks bit for bit, the merge
    within tolerance (every elementwise switch; the l1 rescale is a whole-tensor norm, so not chunkable)."""
    n = data.draw(st.sampled_from([7, 1025, 4099] + ([100_003] if backend in ("cpp", "cuda") else [])))
    cuts = data.draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=4))
    base_offset = data.draw(st.sampled_from([0, 5, 2**34 - 2049]))
    k = data.draw(st.integers(1, 3))
    densities = as_list(data.draw(densities_for(k)), k, 1.0)
    kw = dict(seed=data.draw(seeds), stream=data.draw(streams))
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    whole = mask_probe(backend, n, dtype, densities, offset=base_offset, **kw)
    parts = [mask_probe(backend, b - a, dtype, densities, offset=base_offset + a, **kw) for a, b in _pieces(n, cuts)]
    assert_bitwise_equal(torch.cat(parts), whole, f"{backend}: masks of the pieces {_pieces(n, cuts)}")

    inputs = make_inputs((n,), dtype, k, seed=data.draw(st.integers(0, 2**31 - 1)), device=device_for(backend))
    merge_kw = dict(kw, consensus=data.draw(st.sampled_from(SWITCHES["consensus"])),
                    rescale=data.draw(st.sampled_from([None, "density"])), normalize=data.draw(st.booleans()),
                    sign_on=data.draw(st.sampled_from(SWITCHES["sign_on"])),
                    divisor=data.draw(st.sampled_from(SWITCHES["divisor"])))
    weights = [0.5, -0.25, 1.0][:k]
    y = dare_merge(inputs.base, inputs.tensors, weights, densities, offset=base_offset, backend=backend, **merge_kw)
    pieces = [dare_merge(inputs.base[a:b], [t[a:b] for t in inputs.tensors], weights, densities,
                         offset=base_offset + a, backend=backend, **merge_kw) for a, b in _pieces(n, cuts)]
    atol, rtol = tolerance(dtype, _scale(inputs, weights, densities, merge_kw))
    assert_verbose_allclose(torch.cat(pieces), y, atol, rtol, what="merge of the pieces vs whole")


def test_masks_independent_of_threads(backend):
    """torch.set_num_threads(1) vs 2: the same masks and the same merge, bit for bit."""
    n = 100_003 if backend in ("cpp", "cuda") else 4099
    inputs = make_inputs((n,), torch.float32, 3, seed=32, device=device_for(backend))
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            probe = mask_probe(backend, n, torch.float32, [0.3, 0.5, 0.9], seed=5, stream=6, offset=0)
            merged = dare_merge(inputs.base, inputs.tensors, [1.0, 0.5, -0.5], [0.3, 0.5, 0.9], seed=5, stream=6,
                                consensus="sum", backend=backend)
            results.append((probe, merged))
    finally:
        torch.set_num_threads(previous)
    assert_bitwise_equal(results[1][0], results[0][0], "masks, 2 threads vs 1")
    assert_bitwise_equal(results[1][1], results[0][1], "merge, 2 threads vs 1")


_OMP_SCRIPT = textwrap.dedent("""
    import hashlib, torch
    from fusion_engine.ops import dare_merge
    n = 100_003
    xs = [torch.full((n,), 2.0 ** i) for i in range(3)]
    y = dare_merge(torch.zeros(n), xs, None, [0.2, 0.5, 0.8], seed=2**40 + 3, stream=99, rescale=None, backend="cpp")
    print(hashlib.sha256(y.numpy().tobytes()).hexdigest())
""")


@pytest.mark.slow  # a subprocess per thread count
def test_cpp_masks_independent_of_omp_threads(tmp_path):
    """OMP_NUM_THREADS=1 vs 2 in fresh processes (the extension's OpenMP runtime reads it at load)."""
    from fusion_engine._dispatch import backends

    if not backends()["cpp"].usable:
        pytest.skip(backends()["cpp"].reason)
    skip_unless_kernel(OP, "cpp")
    digests = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _OMP_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)  # an empty folder: import the installed package
        assert out.returncode == 0, out.stderr
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1], f"masks differ between OMP_NUM_THREADS=1 and 2: {digests}"


def _keep_rate_size(backend):
    """Large where the backend is fast (cpp, GPU); the torch reference and the interpreter get less."""
    if backend in ("cpp", "cuda") or device_for(backend).type == "cuda":
        return 200_003
    return 20_003 if backend == "torch" else 4099


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 0.999])
def test_keep_rate(backend, density):
    """The fraction kept is close to the density: within 6 standard deviations (+1/n)."""
    n = _keep_rate_size(backend)
    y = mask_probe(backend, n, torch.float32, [density], seed=2024, stream=stream_id("w"), offset=0)
    rate = float(y.double().mean())
    bound = 6.0 * (density * (1 - density) / n) ** 0.5 + 1.0 / n
    assert abs(rate - density) <= bound, f"kept {rate:.6f} of the entries for density {density} (bound ±{bound:.2g})"


def test_different_streams_seeds_models_offsets(backend):
    n = 4096
    base = dict(seed=1, stream=2, offset=0)
    probe = lambda **kw: mask_probe(backend, n, torch.float32, [0.5], **dict(base, **kw))  # noqa: E731
    reference = probe()
    for change in (dict(seed=2), dict(seed=1 + 2**32), dict(stream=3), dict(stream=2 + 2**31), dict(offset=4),
                   dict(offset=2**34)):
        other = probe(**change)
        assert not torch.equal(other, reference), f"{change} left the mask unchanged"
        agree = float((other == reference).double().mean())
        assert 0.4 < agree < 0.6, f"{change}: masks agree on {agree:.3f} of entries (independent: 0.5)"
    two = mask_probe(backend, n, torch.float32, [0.5, 0.5], **base)
    m0, m1 = (two.cpu() == 1) | (two.cpu() == 3), two.cpu() >= 2
    assert not torch.equal(m0, m1), "two models drew the same mask"
    assert torch.equal(m0.float(), reference.cpu()), "model 0's mask depends on how many models there are"


def test_density_edges(backend):
    inputs = make_inputs((1025,), torch.float32, 2, seed=33, device=device_for(backend))
    for kw in (dict(), dict(consensus="sum"), dict(rescale="l1"), dict(normalize=True)):
        y0 = dare_merge(inputs.base, inputs.tensors, [1.0, 0.5], 0.0, seed=3, backend=backend, **kw)
        assert torch.equal(y0, inputs.base), f"density 0 must leave the base unchanged ({kw})"
    # density 1 keeps everything: with rescale density (1/1) and no consensus, it is task arithmetic
    y1 = dare_merge(inputs.base, inputs.tensors, [1.0, -0.5], 1.0, seed=3, lam=0.7, backend=backend)
    ta = task_arithmetic(inputs.base, inputs.tensors, [1.0, -0.5], lam=0.7, backend=backend)
    atol, rtol = tolerance(torch.float32, 4 * inputs.scale())
    assert_verbose_allclose(y1, ta, atol, rtol, what="dare density 1 vs task_arithmetic")
    ones = mask_probe(backend, 1025, torch.float32, [1.0, 0.0], seed=9, stream=0, offset=0)
    assert torch.equal(ones.cpu(), torch.ones(1025)), "density 1 keeps every entry, density 0 none"


def test_rescale_by_density(backend):
    """rescale="density": the kept entries are multiplied by 1/ρ (DARE's expectation-preserving rescale)."""
    device = device_for(backend)
    y = dare_merge(torch.zeros(4099, device=device), [torch.ones(4099, device=device)], None, 0.25, seed=0,
                   backend=backend).cpu()
    assert set(y.unique().tolist()) <= {0.0, 4.0}
    y = dare_merge(torch.zeros(8, device=device), [torch.ones(8, device=device)], None, 0.5, seed=0,
                   backend=backend).cpu()  # the docstring example
    assert set(y.unique().tolist()) <= {0.0, 2.0}


def test_stream_id():
    """FNV-1a 32-bit of the tensor name: stable across processes and versions."""
    assert stream_id("") == 0x811C9DC5
    assert stream_id("a") == 0xE40C292C
    assert stream_id("foobar") == 0xBF9CF968
    assert stream_id("model.layers.0.self_attn.q_proj.weight") != stream_id("model.layers.1.self_attn.q_proj.weight")


def test_many_models_aliases_and_parameters(backend):
    """K = 9 models (masks of model 8 included); the same tensor passed several times; nn.Parameters."""
    inputs = make_inputs((129,), torch.float32, 9, seed=34, device=device_for(backend))
    weights = [0.5, -1.0, 1.5, 0.25, 1.0, -0.5, 2.0, 0.75, 1.0]
    for kw in (dict(seed=1), dict(seed=2, consensus="count", rescale="l1", normalize=True)):
        check_call(dare_merge, (inputs.base, inputs.tensors, weights, 0.4), kw, backend, inputs.named,
                   scale=_scale(inputs, weights, 0.4, kw), expected_dtype=torch.float32)
    densities = [0.5] * 9
    y = mask_probe(backend, 129, torch.float32, densities[:8], seed=3, stream=4, offset=0)
    assert_bitwise_equal(y.cpu(), expected_probe((129,), torch.float32, densities[:8], seed=3, stream=4, offset=0))
    x = inputs.tensors[0]
    check_call(dare_merge, (inputs.base, [inputs.base, x, x], [1.0, 0.5, 0.5], 0.5), dict(seed=5), backend,
               [("base", inputs.base), ("x", x)], scale=_scale(inputs, [1.0, 0.5, 0.5], 0.5, {}))
    params = [torch.nn.Parameter(t.clone()) for t in (inputs.base, *inputs.tensors[:3])]
    y = dare_merge(params[0], params[1:], None, 0.5, seed=6, backend=backend)
    expected = dare_merge(inputs.base, inputs.tensors[:3], None, 0.5, seed=6, backend="torch")
    assert_verbose_allclose(y.detach(), expected, *tolerance(torch.float32, 8 * inputs.scale()), what="Parameters")
