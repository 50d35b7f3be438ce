"""Run-time counters per attention site, for monitoring in production (thread-safe)."""
from __future__ import annotations

import collections
import copy
import threading
from typing import Any, Dict

_lock = threading.Lock()
_stats: Dict[str, Dict[str, Any]] = {}


def _new_entry() -> Dict[str, Any]:
    return {
        "calls": 0,
        "backward_calls": 0,
        "kernel": collections.Counter(),     # kernel name -> calls
        "precision": collections.Counter(),  # precision -> calls
        "rank": collections.Counter(),       # "dense" / "low-rank" -> head-calls
        "demotions": 0,
        "fallbacks": [],                     # reasons a kernel failed and the reference ran
        "measured_error": None,              # last measured relative L2 of an approximation
    }


def record_call(site: str, kernel: str, precision: str, rank: str, heads: int) -> None:
    with _lock:
        entry = _stats.setdefault(site, _new_entry())
        entry["calls"] += 1
        entry["kernel"][kernel] += 1
        entry["precision"][precision] += 1
        entry["rank"][rank] += heads


def record_backward(site: str) -> None:
    with _lock:
        _stats.setdefault(site, _new_entry())["backward_calls"] += 1


def record_fallback(site: str, reason: str) -> None:
    with _lock:
        entry = _stats.setdefault(site, _new_entry())
        if reason not in entry["fallbacks"]:
            entry["fallbacks"].append(reason)


def stats() -> Dict[str, Dict[str, Any]]:
    """A snapshot: site id -> counters (plain dicts, safe to keep)."""
    with _lock:
        snap = copy.deepcopy(_stats)
    for entry in snap.values():
        for key in ("kernel", "precision", "rank"):
            entry[key] = dict(entry[key])
    return snap


def reset_stats() -> None:
    with _lock:
        _stats.clear()
