"""Philox-4x32-10, the counter-based generator behind every random mask (DARE, DELLA).

The random word of entry j of model i is a pure function of (seed, stream, i, j), so the same
mask comes out of every backend, whatever the chunking, threads or block sizes:

    key     = (seed mod 2^32, seed div 2^32)
    counter = (q mod 2^32, q div 2^32, i, stream)     with q = j div 4
    u_j     = word (j mod 4) of Philox4x32-10(counter, key)

This is the generator of ``triton.language.philox`` (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011). An entry is kept when u_j < floor(ρ · 2^32).
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, register, resolve
from ..errors import ConfigError
from ..launchers._marshal import keep_threshold

ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10


def check_seed(op: str, seed, stream) -> tuple[int, int]:
    if not isinstance(seed, int) or not 0 <= seed < (1 << 64):
        raise ConfigError(f"{op}: seed={seed!r} must be an int in [0, 2^64)")
    if not isinstance(stream, int) or not 0 <= stream < (1 << 32):
        raise ConfigError(f"{op}: stream={stream!r} must be an int in [0, 2^32) "
                          f"(derive it from the tensor name, e.g. fusion_engine.ops.stream_id(name))")
    return seed, stream


def stream_id(name: str) -> int:
    """A stable 32-bit stream id for a tensor name (FNV-1a), so each tensor draws its own mask."""
    h = 0x811C9DC5
    for byte in name.encode():
        h = ((h ^ byte) * 0x01000193) & MASK32
    return h


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·b for b < 2^32, in int64 without overflow (16-bit halves)."""
    p_lo = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (p_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words."""
    for _ in range(ROUNDS):
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def random_words(n: int, *, seed: int, stream: int, model: int, offset: int = 0,
                 device: torch.device | str = "cpu", backend: str | None = None) -> torch.Tensor:
    """The uint32 random words (as int64) of entries offset … offset+n−1 of model ``model``:
    u_j of the formula above, for j = offset … offset+n−1.

    Dispatched like every op: on CPU the C++ kernel (``launchers.cpp.philox_words``, AVX-512 where
    available), elsewhere :func:`random_words_reference`. Every backend gives the same words.
    """
    device = torch.device(device)
    _, kernel = resolve("philox_words", device, None, backend)
    return kernel(n, seed=seed, stream=stream, model=model, offset=offset, device=device)


def random_words_reference(n: int, *, seed: int, stream: int, model: int, offset: int = 0,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`random_words` in plain torch (the oracle)."""
    j = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    q = j >> 2
    full = lambda v: torch.full_like(j, v)  # noqa: E731
    words = philox4x32(q & MASK32, q >> 32, full(model), full(stream), seed & MASK32, seed >> 32)
    return torch.stack(words, dim=-1).gather(-1, (j & 3).unsqueeze(-1)).squeeze(-1)


register("philox_words", torch=random_words_reference, cpp=lambda: cpp_launchers().philox_words, helper=True)


def keep_mask(n: int, density: float, *, seed: int, stream: int, model: int, offset: int = 0,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask of the entries DARE keeps: u_j < floor(ρ · 2^32)."""
    return random_words(n, seed=seed, stream=stream, model=model, offset=offset, device=device) < keep_threshold(density)
