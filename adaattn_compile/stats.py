"""Run-time counters per attention site, for monitoring in production (thread-safe).

``record_call`` runs on every call of the op, so it does one dict look-up and two integer
increments under a lock: the per-call counters live in ``_calls``, keyed by
(site, kernel, precision, rank), and are folded into the per-site entries only when
:func:`stats` takes a snapshot. The lock keeps counts exact when several threads run one
compiled model (an uncontended acquire costs ~0.2 us).
"""
from __future__ import annotations

import collections
import copy
import threading
from typing import Any, Callable, Dict, List, Tuple

_lock = threading.Lock()
_stats: Dict[str, Dict[str, Any]] = {}
# (site, kernel, precision, rank) -> [calls, head-calls, of which low-rank]
_calls: Dict[Tuple[str, str, str, str], List[int]] = {}


def _new_entry() -> Dict[str, Any]:
    return {
        "calls": 0,
        "backward_calls": 0,
        "kernel": collections.Counter(),     # kernel name -> calls
        "precision": collections.Counter(),  # precision -> calls
        "rank": collections.Counter(),       # "dense" / "low-rank" -> head-calls
        "demotions": 0,                      # head-calls refused low rank by the check
        # per query head index: low-rank / exact head-calls of its low-rank calls, the last
        # check's error (largest over the batch), mean normalised entropy and the effective
        # rank of K's centred Gram (means over the batch)
        "heads": {},
        "low_rank_rank": None,               # rank of the low-rank path's weights (D + 1)
        "low_rank_heads": 0,                 # head-calls that kept the low-rank output
        "fallbacks": [],                     # reasons a kernel failed and the reference ran
        "measured_error": None,              # last measured relative L2 of an approximation
        # masks that arrived at run time and were proven causal / empty (see mask_proofs):
        # "causal" or "none" -> calls that ran without reading them
        "run_time_masks": collections.Counter(),
        # run-time masks checked and found not provable (the site stops checking after
        # mask_proofs.GIVE_UP of them in a row)
        "run_time_mask_misses": 0,
        # adaptive precision: checks of a rung below the inputs' precision, the last error
        # each rung measured, and the demotions ("int8 -> bf16: 4.4e-02 > 0.01")
        "precision_checks": 0,
        "precision_errors": {},
        "precision_demotions": [],
    }


def _entry(site: str) -> Dict[str, Any]:
    """The site's entry, created on first use (call with ``_lock`` held)."""
    entry = _stats.get(site)
    if entry is None:
        entry = _stats[site] = _new_entry()
    return entry


def record_call(site: str, kernel: str, precision: str, rank: str, heads: int) -> None:
    key = (site, kernel, precision, rank)
    with _lock:
        counts = _calls.get(key)
        if counts is None:
            _entry(site)   # keeps sites in the order they were first seen
            counts = _calls[key] = [0, 0]
        counts[0] += 1
        counts[1] += heads


def record_rank_check(site: str, checks, forced: bool) -> None:
    """One low-rank call's routing (a :class:`adaattn_compile.rank.HeadChecks`): which heads
    kept the low-rank output and, for a call that ran the check, what it measured."""
    with _lock:
        entry = _entry(site)
        entry["low_rank_rank"] = checks.rank
        entry["low_rank_heads"] += checks.taken_count
        if not forced:
            entry["demotions"] += len(checks.taken) - checks.taken_count
        measured = checks.error is not None
        seen = {}
        for i, taken in enumerate(checks.taken):
            head = i % checks.heads
            row = entry["heads"].setdefault(head, {"low_rank": 0, "exact": 0, "error": None,
                                                   "entropy": None, "k_rank": None})
            row["low_rank" if taken else "exact"] += 1
            if measured:
                last = seen.setdefault(head, [[], [], []])
                last[0].append(checks.error[i])
                last[1].append(checks.entropy[i])
                last[2].append(checks.k_rank[i])
        for head, (errors, entropies, ranks) in seen.items():
            row = entry["heads"][head]
            row["error"] = max(errors, key=lambda e: float("inf") if e != e else e)
            row["entropy"] = sum(entropies) / len(entropies)
            row["k_rank"] = sum(ranks) / len(ranks)
        if measured:
            used = [e for t, e in zip(checks.taken, checks.error) if t]
            if used:
                entry["measured_error"] = max(used)


def record_precision_check(site: str, precision: str, error, demoted_to=None,
                           why: str = "") -> None:
    """A check of ``precision`` on sampled rows (``error`` None: not measured, e.g. the range
    check of fp16) and, if it failed, the rung the site moved up to."""
    with _lock:
        entry = _entry(site)
        if error is not None:
            entry["precision_checks"] += 1
            entry["precision_errors"][precision] = error
        if demoted_to is None:
            entry["measured_error"] = error
        else:
            note = f"{precision} -> {demoted_to}: {why}"
            if note not in entry["precision_demotions"]:
                entry["precision_demotions"].append(note)


def record_backward(site: str) -> None:
    with _lock:
        _entry(site)["backward_calls"] += 1


def record_mask_proof(site: str, kind: str) -> None:
    with _lock:
        _entry(site)["run_time_masks"][kind] += 1


def record_mask_miss(site: str) -> None:
    with _lock:
        _entry(site)["run_time_mask_misses"] += 1


def record_fallback(site: str, reason: str) -> None:
    with _lock:
        entry = _entry(site)
        if reason not in entry["fallbacks"]:
            entry["fallbacks"].append(reason)


_settlers: List[Callable[..., None]] = []


def add_settler(fn: Callable[..., None]) -> None:
    """``fn(wait=True)`` runs before each snapshot: the op folds in the low-rank checks still
    on their way from the device."""
    if fn not in _settlers:
        _settlers.append(fn)


def stats() -> Dict[str, Dict[str, Any]]:
    """A snapshot: site id -> counters (plain dicts, safe to keep)."""
    for settle in list(_settlers):
        settle(wait=True)
    with _lock:
        snap = copy.deepcopy(_stats)
        calls = [(key, tuple(counts)) for key, counts in _calls.items()]
    for (site, kernel, precision, rank), (n, heads) in calls:
        entry = snap[site]
        entry["calls"] += n
        entry["kernel"][kernel] += n
        entry["precision"][precision] += n
        entry["rank"][rank] += heads
    for entry in snap.values():
        low = entry.pop("low_rank_heads")
        if low:   # recorded as dense when the call ran, kept low rank by its check
            entry["rank"]["dense"] -= low
            entry["rank"]["low-rank"] = low
            if not entry["rank"]["dense"]:
                del entry["rank"]["dense"]
    for entry in snap.values():
        for key in ("kernel", "precision", "rank", "run_time_masks"):
            entry[key] = dict(entry[key])
    return snap


def reset_stats() -> None:
    with _lock:
        _stats.clear()
        _calls.clear()
