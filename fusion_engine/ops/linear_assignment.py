"""Linear assignment (the linear sum assignment problem), exactly, for one cost matrix or a batch.

.. math::  \\min_{\\pi} \\sum_{t=1}^{k} C_{r_t, \\pi(r_t)}, \\qquad k = \\min(n, m)

over injective matchings of k rows to k columns (every row when n ≤ m, every column when n > m).
The results are ``scipy.optimize.linear_sum_assignment``'s, ties included: both backends run scipy's
shortest-augmenting-path algorithm with its arithmetic and its tie-breaking; the cpp backend
(csrc/core/linear_assignment.cpp) with vectorised sweeps, a batch spread over threads.
"""

from __future__ import annotations

import math

import torch

from .._dispatch import cpp_launchers, register, resolve
from . import _common as C

OP = "linear_assignment"


def linear_assignment(cost: torch.Tensor, *, maximize: bool = False,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal assignment of rows to columns of a cost matrix (or of each matrix of a batch).

    .. math::  \\min_{\\pi} \\sum_{t=1}^{k} C_{r_t, \\pi(r_t)}   (``maximize=True``: max)

    where C is n × m, k = min(n, m), the r_t are k distinct rows (all rows when n ≤ m) in ascending
    order and π maps them to distinct columns. The optimum is exact (costs are converted to float64).
    Among several optimal assignments, every backend returns the one scipy returns (the same
    algorithm, arithmetic and tie-breaking: the identity on a constant matrix, for one). This is
    ``scipy.optimize.linear_sum_assignment``, batched.

    Parameters
    ----------
    cost : tensor [n, m] or [B, n, m]
        Finite costs, any float dtype (fp16, bf16, fp32, fp64), integer or bool (converted to float64),
        any layout, any device: CUDA tensors are copied to the host (the solver runs on the CPU).
    maximize : bool
        Maximise the total instead of minimising it.
    backend : "cpp" (C++ with AVX2 sweeps, the automatic choice) or "torch" (the reference, the same
        algorithm with a Python loop per step, slow: the oracle of the tests at small sizes).

    Returns
    -------
    (row_ind, col_ind) : two int64 CPU tensors of length k (``cost`` [n, m]) or [B, k] (``cost``
        [B, n, m]); ``row_ind`` ascending (``arange(n)`` when n ≤ m), so that
        ``cost[row_ind, col_ind].sum()`` is the optimal total.

    The cpp backend solves the problems of a batch in parallel, one per thread
    (``torch.get_num_threads()`` threads, the GIL released); each thread holds a float64 copy of its
    problem (8·n·m bytes). The answer does not depend on the number of threads.

    Infinite costs follow scipy: +inf (−inf with ``maximize``) forbids a pair; the optimum avoids every
    forbidden pair, and a problem whose every assignment uses one is infeasible.

    Raises
    ------
    NonFiniteError (a ValueError)
        A cost is NaN, or −inf (+inf with ``maximize``): "matrix contains invalid numeric entries", as scipy
        says; the message names the problem of the batch.
    ConfigError (a ValueError)
        "cost matrix is infeasible": no assignment avoids the forbidden pairs.

    Example
    -------
    >>> linear_assignment(torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
    (tensor([0, 1, 2]), tensor([1, 0, 2]))

    References: R. Jonker and A. Volgenant, "A shortest augmenting path algorithm for dense and sparse
    linear assignment problems", Computing 38, 1987; D. F. Crouse, "On implementing 2D rectangular
    assignment algorithms", IEEE TAES 52(4), 2016.
    """
    if not isinstance(cost, torch.Tensor):
        raise C.ConfigError(f"{OP}: cost is a {type(cost).__name__}, not a torch.Tensor "
                            f"(wrap a NumPy array with torch.from_numpy)")
    if cost.dim() not in (2, 3):
        raise C.ShapeMismatchError(
            f"{OP}: cost has shape {tuple(cost.shape)}: expected a matrix (2-D array) [n, m] or a batch of them "
            f"[B, n, m]"
        )
    if not isinstance(maximize, bool):
        raise C.ConfigError(f"{OP}: maximize={maximize!r} must be True or False")
    if cost.is_complex():
        raise C.DTypeMismatchError(f"{OP}: cost has complex dtype {cost.dtype}; pass real costs")
    host = cost.detach()
    if host.device.type != "cpu":
        host = host.to("cpu")
    if host.dtype not in C.FLOAT_DTYPES:
        host = host.to(torch.float64)  # integers and bools: exact up to 2**53
    batch = host if host.dim() == 3 else host.unsqueeze(0)
    label = (lambda b: f"cost[{b}]") if cost.dim() == 3 else (lambda b: "cost")
    _check_range(batch)
    _, kernel = resolve(OP, torch.device("cpu"), batch.dtype, backend)
    with torch.no_grad():
        row_ind, col_ind, bad = kernel(batch, maximize=maximize)
    if bad >= 0:  # scipy's rule: +inf (−inf when maximising) forbids a pair; NaN and the other infinity are invalid
        raise C.NonFiniteError(
            f"{OP}: {label(bad)}: matrix contains invalid numeric entries (NaN, or "
            f"{'+' if maximize else '-'}inf when {'maximising' if maximize else 'minimising'}); "
            f"forbid a pair with {'-' if maximize else '+'}inf")
    infeasible = (col_ind < 0).any(dim=1).nonzero().flatten() if col_ind.numel() else col_ind.new_empty(0)
    if infeasible.numel():
        raise C.ConfigError(f"{OP}: cost matrix is infeasible: {label(int(infeasible[0]))} has no assignment "
                            f"that avoids every forbidden ({'-' if maximize else '+'}inf) pair")
    if cost.dim() == 2:
        return row_ind[0], col_ind[0]
    return row_ind, col_ind


MAX_ABS_COST = 1e200  # path lengths (sums of up to n cost differences) stay far from float64 overflow


def _check_range(batch: torch.Tensor) -> None:
    """Finite costs beyond ±1e200 (only float64 holds them) would overflow the path lengths; ±inf are
    forbidden or invalid pairs (the kernel reports the invalid ones)."""
    if batch.dtype != torch.float64 or batch.numel() == 0:
        return
    lo, hi = (float(x) for x in torch.aminmax(batch))  # one pass, no temporary
    largest = max(-lo, hi)
    if not math.isfinite(largest):
        magnitude = batch.abs()
        largest = float(torch.where(torch.isinf(magnitude), 0.0, magnitude).amax())
    if largest > MAX_ABS_COST:
        raise C.ConfigError(
            f"{OP}: cost holds a value of magnitude {largest:.3g}, beyond the solver's range of ±{MAX_ABS_COST:g}; "
            f"rescale the costs (the optimal assignment does not change when all costs are multiplied by one "
            f"positive number)"
        )


def linear_assignment_reference(cost: torch.Tensor, *, maximize: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Kernel-level oracle: cost [B, n, m] (CPU, any float dtype and layout) →
    ``(row_ind [B, k], col_ind [B, k], bad)`` with ``bad`` the index of the first problem holding NaN
    or −inf (+inf when maximising; -1 if none; such problems are not solved). A problem with no
    assignment avoiding its +inf pairs (−inf when maximising) gets -1 in all its entries."""
    batch, n, m = cost.shape
    k = min(n, m)
    row_ind = torch.zeros((batch, k), dtype=torch.int64)
    col_ind = torch.zeros((batch, k), dtype=torch.int64)
    for b in range(batch):
        problem = cost[b].to(torch.float64)
        if maximize:
            problem = -problem
        if bool((torch.isnan(problem) | (problem == float("-inf"))).any()):
            return row_ind, col_ind, b
        transposed = n > m
        rows_to_cols = _shortest_augmenting_paths(problem.T if transposed else problem)
        if rows_to_cols is None:
            row_ind[b], col_ind[b] = -1, -1
        elif transposed:  # the solved rows are our columns: list our rows in ascending order
            order = torch.argsort(rows_to_cols)
            row_ind[b] = rows_to_cols[order]
            col_ind[b] = order
        else:
            row_ind[b] = torch.arange(n)
            col_ind[b] = rows_to_cols
    return row_ind, col_ind, -1


def _shortest_augmenting_paths(cost: torch.Tensor) -> torch.Tensor | None:
    """Minimum-cost assignment of every row of an n × m (n ≤ m) float64 matrix: the column of each
    row, or None when no assignment avoids the +inf entries. scipy's algorithm (Crouse 2016), with
    its arithmetic and its tie-breaking, so that the result is scipy's, ties included.

    Rows are added one at a time. Row duals u and column duals v (starting at 0) keep every reduced
    cost C_ij − u_i − v_j ≥ 0, with equality on assigned pairs. For a new row f, Dijkstra from f: a
    scanned row i offers column j the distance ``((minVal + C_ij) − u_i) − v_j`` (minVal: the
    distance reached so far; this order of operations is scipy's). The next column is one at the
    minimum distance: the free one that comes last in scipy's visiting order if any, else the first
    in that order; the order starts as m−1, …, 1, 0 and loses each scanned column by moving the last
    one into its place. Reaching a free column ends the path: the duals move by the path lengths
    and the path is flipped, growing the assignment by one.
    """
    n, m = cost.shape
    u = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(m, dtype=torch.float64)
    row_of_col = torch.full((m,), -1, dtype=torch.int64)
    col_of_row = torch.full((n,), -1, dtype=torch.int64)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for f in range(n):
        dist = torch.full((m,), float("inf"), dtype=torch.float64)   # path length to each column
        pred = torch.full((m,), -1, dtype=torch.int64)               # the row before each column
        done = torch.zeros(m, dtype=torch.bool)                      # columns whose distance is final
        remaining = list(range(m - 1, -1, -1))                       # scipy's visiting order
        position = torch.tensor(remaining)                           # of each column in it
        scanned_rows = [f]
        i, reached = f, 0.0
        while True:
            through_i = ((reached + cost[i]) - u[i]) - v
            better = ~done & (through_i < dist)
            dist = torch.where(better, through_i, dist)
            pred = torch.where(better, torch.tensor(i), pred)
            open_dist = torch.where(done, inf, dist)
            reached = float(open_dist.min())
            if reached == float("inf"):
                return None
            nearest = open_dist == reached
            nearest_free = nearest & (row_of_col < 0)
            if bool(nearest_free.any()):
                j = int(torch.where(nearest_free, position, -1).argmax())
            else:
                j = int(torch.where(nearest, position, m).argmin())
            done[j] = True
            moved = remaining.pop()  # j leaves the order: the last column takes its place
            if moved != j:
                remaining[int(position[j])] = moved
                position[moved] = position[j]
            if int(row_of_col[j]) < 0:
                sink = j
                break
            i = int(row_of_col[j])
            scanned_rows.append(i)
        # dual update: u_f grows by the path length, the other scanned rows and columns by the slack
        u[f] += reached
        for row in scanned_rows[1:]:
            u[row] += reached - dist[col_of_row[row]]
        v[done] -= reached - dist[done]
        # flip the path
        j = sink
        while True:
            i = int(pred[j])
            row_of_col[j] = i
            j, col_of_row[i] = int(col_of_row[i]), j
            if i == f:
                break
    return col_of_row


register(OP, torch=linear_assignment_reference,
         cpp=lambda: cpp_launchers().linear_assignment)
