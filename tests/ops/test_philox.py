"""The Philox-4x32-10 generator behind every DARE mask: known-answer vectors, counter layout, and
agreement with triton.language.philox (what the triton kernels call)."""

import pytest
import torch

from fusion_engine.ops.philox import keep_mask, keep_threshold, philox4x32, random_words, random_words_reference

# Random123's kat_vectors for philox4x32_10: (counter, key) -> output
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_counter_layout():
    """Entry j of model i: counter (q lo, q hi, i, stream) with q = j // 4, word j % 4; key = seed lo, hi."""
    seed, stream, model = 2**40 + 12345, 77, 3
    for j in (0, 1, 2, 3, 4, 7, 2**34 + 2, 2**40 + 1):
        q = j // 4
        counter = (q & 0xFFFFFFFF, q >> 32, model, stream)
        words = philox4x32(*(torch.tensor([c]) for c in counter), seed & 0xFFFFFFFF, seed >> 32)
        got = random_words(1, seed=seed, stream=stream, model=model, offset=j)
        assert int(got) == int(words[j % 4]), j


def test_offset_is_a_window():
    whole = random_words(1000, seed=5, stream=6, model=1, offset=2**34 - 500)
    for a, b in ((0, 1), (3, 17), (499, 501), (997, 1000)):
        part = random_words(b - a, seed=5, stream=6, model=1, offset=2**34 - 500 + a)
        assert torch.equal(part, whole[a:b])


def test_keep_threshold():
    assert keep_threshold(0.0) == 0 and keep_threshold(1.0) == 2**32 and keep_threshold(0.5) == 2**31
    assert keep_threshold(2.0**-33) == 0 and keep_threshold(2.0**-32) == 1
    assert bool(keep_mask(4096, 1.0, seed=1, stream=2, model=0).all())
    assert not bool(keep_mask(4096, 0.0, seed=1, stream=2, model=0).any())


def test_matches_triton_philox():
    """The spec says this is triton.language.philox: check it under the interpreter (or on a GPU)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from fusion_engine._dispatch import triton_interpret

    if not (torch.cuda.is_available() or triton_interpret()):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    @triton.jit
    def _words_kernel(out_ptr, seed, offset, model, philox_stream, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        j = offset + idx
        q = j // 4
        c0 = q.to(tl.uint32)
        c1 = (q >> 32).to(tl.uint32)
        zero = tl.zeros_like(c0)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + model, zero + philox_stream)
        r = j % 4
        word = tl.where(r == 0, r0, tl.where(r == 1, r1, tl.where(r == 2, r2, r3)))
        tl.store(out_ptr + idx, word, mask=idx < n)

    n = 1000
    for seed, offset, model, stream in ((0, 0, 0, 0), (123456789012345, 5, 3, 77), (2**64 - 1, 2**34 - 10, 2, 2**31 - 1)):
        out = torch.empty(n, dtype=torch.uint32, device=device)
        _words_kernel[(triton.cdiv(n, 256),)](out, seed, offset, model, stream, n, BLOCK=256)
        got = out.cpu().to(torch.int64) & 0xFFFFFFFF
        expected = random_words(n, seed=seed, stream=stream, model=model, offset=offset)
        assert torch.equal(got, expected), (seed, offset, model, stream)


@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (1000, 5), (4097, 2**34 - 3), (70_001, 2**33 + 1)])
def test_random_words_kernel_equals_reference(n, offset):
    """The C++ word generator (AVX-512 where present) gives the torch reference's words."""
    got = random_words(n, seed=2**40 + 7, stream=3, model=2, offset=offset)
    assert torch.equal(got, random_words_reference(n, seed=2**40 + 7, stream=3, model=2, offset=offset))
