"""Adaptive rank at run time: which heads of a call keep the low-rank kernel's output.

Per call (planned ``rank="auto"`` or forced ``"low"``), all on the device:

1. the low-rank kernel (:mod:`.kernels.lowrank`) runs on every head: O(L D Dv), a few percent
   of the dense kernel at the lengths it is planned for;
2. the estimator picks, per (batch, head), ``SAMPLED_ROWS`` query rows: half spread evenly
   over the sequence, half the worst-rated rows -- rated by their mean squared score
   deviation from the mean key (``q^T G q`` with G the centred Gram of K: the second-order
   term the linearisation drops), so the rows most likely to be wrong are among those checked;
3. those rows are recomputed exactly (fp32 sums), with their normalised entropy, and K's
   spectrum is summed up (the effective rank of its centred Gram, ``trace^2 / |G|_F^2``,
   shown per head); the relative L2
   error of the kernel's rows against them is the head's measured error, and the head keeps
   the low-rank rows only where it is inside the tolerance (and every sampled row is finite;
   an unusable row is rated worst, so it is sampled);
4. the dense fix-up kernel recomputes exactly the heads refused; its programs for the other
   heads return at once.

No step waits for the host: the measured errors travel back with a non-blocking copy and
reach the statistics (and the back-off after a call that took no head) when they have
arrived -- at the site's next call, or when :func:`adaattn_compile.stats` is read.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

SAMPLED_ROWS = 64   # per (batch, head): the exact rows cost SAMPLED_ROWS / Lq of the dense kernel


@dataclasses.dataclass
class HeadChecks:
    """One call's routing, per (batch, head) in ``B * Hq`` order (host values)."""
    heads: int                 # Hq (the per-head index is position % heads)
    taken: List[bool]          # kept the low-rank output
    error: Optional[List[float]]    # relative L2 on the sampled rows (NaN: unusable rows);
    entropy: Optional[List[float]]  # mean normalised entropy of the sampled exact rows;
    k_rank: Optional[List[float]]   # effective rank of K's centred Gram;
    #                                 all three None for a call that ran no check
    rank: int                  # rank of the low-rank path's weights outside the exact band

    @property
    def taken_count(self) -> int:
        return sum(self.taken)


_EVEN_ROWS: dict = {}


def sample_rows(worst, lq: int, samples: int = SAMPLED_ROWS) -> torch.Tensor:
    """``(B * Hq, samples)`` int32 query positions per head: ``samples / 2`` evenly spread, and
    the worst rows (``worst = (rating, row)`` per query block, from the low-rank kernel) of
    the ``samples / 2`` blocks rated worst."""
    rating, row = worst
    half = samples // 2
    key = (lq, half, rating.device)
    even = _EVEN_ROWS.get(key)
    if even is None:   # (kept per length and device: a handful of ops less per call)
        if len(_EVEN_ROWS) > 64:   # dynamic lengths: keep it small
            _EVEN_ROWS.clear()
        even = _EVEN_ROWS[key] = torch.linspace(0, lq - 1, half, device=rating.device).round().to(
            torch.int32)
    picked = torch.topk(rating, min(half, rating.shape[1]), dim=1).indices
    rows = row.gather(1, picked)
    if rows.shape[1] < half:   # fewer blocks than half the samples: repeat
        rows = rows.repeat(1, -(-half // rows.shape[1]))[:, :half]
    return torch.cat([even.expand(rating.shape[0], half), rows], 1)


# A (site, bucket)'s heads are checked on its first low-rank call and every CHECK_EVERY calls
# after; in between, a head keeps the low-rank output while its worst row rating stays within
# the budget its last check left (see kernels/lowrank.py, _decide_kernel).
CHECK_EVERY = 16


@dataclasses.dataclass
class RouteState:
    """What the last check decided, on the device, for the calls until the next one."""
    taken: torch.Tensor         # (B * Hq,) int32
    budget: torch.Tensor        # (B * Hq,) fp32: the rating up to which a head stays low rank
    calls: int = 0              # calls since the check


@dataclasses.dataclass
class Pending:
    """A call's routing on its way to the host: ``result()`` gives the :class:`HeadChecks`."""
    measured: Optional[torch.Tensor]   # (3, B * Hq): error, entropy, K's rank; None: no
    #                                    check this call
    kept: torch.Tensor                 # (B * Hq,) int32
    heads: int
    rank: int
    event: Optional[torch.cuda.Event] = None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def result(self) -> HeadChecks:
        if self.event is not None:
            self.event.synchronize()
        taken = [bool(t) for t in self.kept.tolist()]
        if self.measured is None:
            return HeadChecks(self.heads, taken, None, None, None, self.rank)
        error, entropy, k_rank = self.measured.tolist()
        return HeadChecks(self.heads, taken, error, entropy, k_rank, self.rank)


def route(q, k, v, is_causal: bool, scale, tolerance: float, force: bool,
          state: Optional[RouteState] = None, capturing: bool = False):
    """``(out, lse, pending, state)`` for 4-D ``q (B, Hq, Lq, D)``, ``k``/``v (B, Hkv, Lk, .)``:
    the low-rank output on the heads that keep it, exact attention on the others. A check
    runs when ``state`` (what the last one left) is None or ``CHECK_EVERY`` calls old.
    ``force``: keep every head's low-rank rows whatever the error (still measured; a head
    with unusable rows is recomputed all the same). ``capturing`` (CUDA-graph capture, with a
    ``state``): no check and no copy home; ``pending`` is None."""
    from .kernels import lowrank

    LQ = q.shape[2]
    out, lse, (rating, worst_row), keys = lowrank.lowrank_forward(q, k, v, is_causal, scale)
    if state is None or (state.calls + 1 >= CHECK_EVERY and not capturing):
        rows = sample_rows((rating, worst_row), LQ)
        measured, taken, budget = lowrank.check_rows(q, k, v, out, rows, is_causal, scale,
                                                     rating, keys, tolerance, force)
        state = RouteState(taken, budget)
        kept = lowrank.exact_heads(q, k, v, out, lse, taken, rating, budget, False, is_causal,
                                   scale)
    else:
        state.calls += 1
        measured = None
        kept = lowrank.exact_heads(q, k, v, out, lse, state.taken, rating, state.budget, True,
                                   is_causal, scale)
    if capturing:
        return out, lse, None, state
    pending = Pending(measured, kept, q.shape[1], lowrank.rank_of(q.shape[-1]))
    if q.is_cuda:   # start the copy home; read it when it has arrived
        if measured is not None:
            pending.measured = measured.to("cpu", non_blocking=True)
        pending.kept = kept.to("cpu", non_blocking=True)
        pending.event = torch.cuda.Event()
        pending.event.record()
    return out, lse, pending, state
