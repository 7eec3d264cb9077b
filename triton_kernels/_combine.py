"""The combine step shared by the TIES and DARE kernels (oracle: ``ops._common.combine_reference``).

With v_i the trimmed/dropped (and rescaled) task vectors and e_i = w_i v_i (``sign_on="weighted"``)
or v_i (``"unweighted"``), the majority sign is s = sign(Σ e_i) (``"sum"``) or sign(Σ sign e_i)
(``"count"``), +1 for a zero total; a_i = [sign e_i = s]; y = b + λ N / D with N = Σ a_i w_i v_i and
D = Σ a_i w_i (``divisor="weights"``) or Σ a_i (``"count"``), 0 → 1.

Since a_i only depends on whether s is + or −, a single pass over the K models suffices: it keeps
N and D for the positive and the negative entries side by side, plus the election total, and picks
one side at the end. Without consensus: N = Σ w_i v_i and D = Σ w_i (a host scalar).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS_NORM = 1e-7   # below this L1 norm the rescale is skipped (ops._common.EPS_NORM)


def l1_scales(l1_all: torch.Tensor, l1_kept: torch.Tensor) -> torch.Tensor:
    """The L1 rescale of TIES/DARE: s_i = ‖δ_i‖₁ / ‖m_i ⊙ δ_i‖₁ from fp64 norms, or 1 when either is
    below 1e-7; returned in fp32 like the reference's scalar."""
    skip = (l1_all < EPS_NORM) | (l1_kept < EPS_NORM)
    return torch.where(skip, torch.ones_like(l1_all), l1_all / l1_kept).to(torch.float32)


@triton.jit
def combine_init(like):
    """Zeroed fp32 state (N₊, N₋, D₊, D₋, total) shaped like ``like``; without consensus only N₊
    is used."""
    zero = tl.zeros_like(like).to(tl.float32)
    return zero, zero, zero, zero, zero


@triton.jit
def combine_add(num_pos, num_neg, den_pos, den_neg, total, v, w, CONSENSUS: tl.constexpr,
                SIGN_COUNT: tl.constexpr, SIGN_WEIGHTED: tl.constexpr, DIVISOR_COUNT: tl.constexpr):
    """Add model i (fp32 block ``v``, scalar weight ``w``) to the state (N₊, N₋, D₊, D₋, total)."""
    weighted = w * v
    if CONSENSUS:
        if SIGN_WEIGHTED:
            e = weighted
        else:
            e = v
        pos = e > 0
        neg = e < 0
        # a NaN entry agrees with neither sign but, like the reference's NaN * 0, poisons N
        nan_part = tl.where(weighted != weighted, weighted, 0.0)
        num_pos += tl.where(pos, weighted, nan_part)
        num_neg += tl.where(neg, weighted, nan_part)
        if DIVISOR_COUNT:
            den_pos += pos.to(tl.float32)
            den_neg += neg.to(tl.float32)
        else:
            den_pos += tl.where(pos, w, 0.0)
            den_neg += tl.where(neg, w, 0.0)
        if SIGN_COUNT:
            total += pos.to(tl.float32) - neg.to(tl.float32)
        else:
            total += e
    else:
        num_pos += weighted
    return num_pos, num_neg, den_pos, den_neg, total


@triton.jit
def combine_finish(num_pos, num_neg, den_pos, den_neg, total, b, lam, total_weight,
                   CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr):
    """y = b + λ · (N / D if NORMALIZE else N), in fp32 (``b`` an fp32 block)."""
    if CONSENSUS:
        positive = total >= 0
        num = tl.where(positive, num_pos, num_neg)
        den = tl.where(positive, den_pos, den_neg)
        den = tl.where(den == 0, 1.0, den)
    else:
        num = num_pos
        den = tl.zeros_like(num) + total_weight
    if NORMALIZE:
        mixed = tl.math.div_rn(num, den)  # IEEE division, like torch
    else:
        mixed = num
    return b + lam * mixed
