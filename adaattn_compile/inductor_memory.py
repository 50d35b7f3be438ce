"""Inductor's buffer reuse in our compiles: short holds only (``ADAATTN_BUFFER_REUSE``).

Inductor lets a new buffer take the storage of a dead one of its size ("pooled reuse"). Where
the dead buffer's last use is the step just before, that is free: it would be freed and the
new one allocated at the same point. Across a range of steps it *holds* the dead buffer
through them, which Inductor allows wherever its estimate of the graph's peak says the hold
costs nothing; the estimate counts every buffer as a fresh allocation, also those written in
place of a dying input, so it runs high where a graph's largest step writes in place (an
MLP's activation). Stock graphs of eager attention peak at the (H, L, L) scores, which no
hold fits under; ours have no scores, and Inductor then kept a layer's two (L, 8192) MLP
buffers through the next layer's attention (17 steps on): HF Llama eager at L = 512 peaked
29.06 MiB above its inputs against stock's 28.50 on the H100, 24.06 without pooled reuse
(2026-11-27).

No pooled reuse at all (``allow_buffer_reuse=False``) cost host time instead: every dead
buffer an allocation a call. all-MiniLM-L6-v2 at L = 512, a host-bound graph whose sites all
stay torch's SDPA, allocated 67 buffers a forward without reuse and 42 with Inductor's, and
ran 0.91-0.94x stock without, 1.08x with (H100, 2026-11-27). Its 25 reuses are holds across
at most one step (11, the (L, 384) hidden states) and holds of per-token vectors (14, L
floats); so our compiles keep a reuse Inductor chooses where the hold spans at most one step
or the buffer is under 1/1024 of Inductor's estimate of the graph's peak (a bound on what
the hold can add), and drop the longer holds of larger buffers.

``ADAATTN_BUFFER_REUSE`` (read at compile time): ``short`` (the default), ``0``/``off`` (no
pooled reuse), ``1``/``on`` (Inductor's own). Where Inductor's planner is not the one this
was written against (torch 2.11 and 2.13: ``AllocateLine.should_reuse_buffer``), ``short``
becomes ``off``, which keeps the peak. A compile with short holds carries a tag into
Inductor's cache keys (:func:`_short_holds_cache_tag`), so that its plan and another's are
never served for each other; a user's own keyed post-grad pass still runs, keyed with it.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
from typing import Callable, Optional

log = logging.getLogger("adaattn")

MODES = {"short": "short", "": "short", "0": "off", "off": "off", "1": "on", "on": "on"}

# A hold spanning at most this many steps between the dead buffer's last use and the new
# buffer's allocation is kept (1: the step just before, which holds nothing) ...
MAX_HELD_STEPS = 2
# ... as is one of a buffer this small against Inductor's estimate of the graph's peak.
SMALL_HOLD_FRACTION = 1 / 1024

# Set while one of our inner compiles runs (forward and backward graphs: both go through the
# inner compile handed to compile_fx), read by the planner's reuse check below; stock
# compiles in the same process never see it (nor does an inner compile Inductor runs in a
# subprocess: that one plans with Inductor's own reuse).
_SHORT_HOLDS = contextvars.ContextVar("adaattn_short_holds", default=False)
_install_lock = threading.Lock()
_installed: Optional[bool] = None


def mode() -> str:
    """``ADAATTN_BUFFER_REUSE`` as one of short / off / on (an unknown value: short, with a
    warning in the log)."""
    value = os.environ.get("ADAATTN_BUFFER_REUSE", "short").strip().lower()
    if value not in MODES:
        log.warning("adaattn: ADAATTN_BUFFER_REUSE=%r is not one of %s; using 'short'",
                    value, ", ".join(sorted(k for k in MODES if k)))
        return "short"
    return MODES[value]


def _install() -> bool:
    from torch._inductor.codegen import wrapper

    line_cls = getattr(wrapper, "AllocateLine", None)
    inductors = getattr(line_cls, "should_reuse_buffer", None)
    if inductors is None:
        return False
    if getattr(inductors, "_adaattn_short_holds", False):
        return True

    @functools.wraps(inductors)
    def should_reuse_buffer(self, free_line, size):
        if not inductors(self, free_line, size):
            return False
        if not _SHORT_HOLDS.get() or getattr(self, "comm_buffer", False):
            return True
        # (the indices Inductor's own check compares: the dead buffer's last step, this one)
        held_steps = self.scheduler_node_index - free_line.scheduler_node_index
        return held_steps <= MAX_HELD_STEPS or size <= SMALL_HOLD_FRACTION * _peak_estimate(self)

    should_reuse_buffer._adaattn_short_holds = True
    line_cls.should_reuse_buffer = should_reuse_buffer
    return True


def _peak_estimate(line) -> float:
    peak = getattr(getattr(line.wrapper, "estimate_peak", None), "overall_peak_memory", None)
    return float(peak) if isinstance(peak, (int, float)) else 0.0


def install() -> bool:
    """Wrap Inductor's reuse check (once a process) -> whether ``short`` can be honoured."""
    global _installed
    with _install_lock:
        if _installed is None:
            try:
                _installed = _install()
            except Exception as exc:   # (Inductor's internals moved: no pooled reuse instead)
                log.debug("adaattn: short-hold buffer reuse unavailable (%s: %s)",
                          type(exc).__name__, exc)
                _installed = False
        return _installed


_TAG_UUID = f"adaattn-buffer-reuse-short-{MAX_HELD_STEPS}-{SMALL_HOLD_FRACTION}"
_tag_class = None


def _short_holds_cache_tag(users_pass=None):
    """A post-grad pass whose ``uuid`` enters Inductor's cache keys (FX graph and AOT autograd
    caches: Inductor's way to key a compile on a custom pass): a graph planned with short holds
    is then never served to a compile planned otherwise (stock torch.compile of the same graph,
    another ``ADAATTN_BUFFER_REUSE``), nor one of theirs to ours. It runs ``users_pass`` (the
    user's own keyed pass, which the config slot held) and is keyed by its uuid and ours
    together; alone it does nothing. None where the hook is missing, or for a user's pass with
    no uuid (Inductor then bypasses its caches: no plans to tell apart)."""
    global _tag_class
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return None
    if users_pass is not None and not isinstance(users_pass, CustomGraphPass):
        return None
    if _tag_class is None:

        class ShortHoldsCacheTag(CustomGraphPass):
            def __init__(self, users_pass=None):
                self.users_pass = users_pass

            def __call__(self, graph) -> None:
                if self.users_pass is not None:
                    self.users_pass(graph)

            def uuid(self):
                if self.users_pass is None:
                    return _TAG_UUID
                return (_TAG_UUID, self.users_pass.uuid())
        _tag_class = ShortHoldsCacheTag
    return _tag_class(users_pass)


def compile_settings() -> tuple:
    """-> (Inductor config patches, a wrapper for the inner compile or None) for one compile."""
    from torch._inductor import config

    chosen = mode()
    if chosen == "short" and not install():
        chosen = "off"
    if chosen == "off":
        return {"allow_buffer_reuse": False}, None
    if chosen == "on":
        return {}, None
    tag = (_short_holds_cache_tag(config.post_grad_custom_post_pass)
           if hasattr(config, "post_grad_custom_post_pass") else None)
    return ({"post_grad_custom_post_pass": tag} if tag is not None else {}), short_holds


def short_holds(inner_compile: Callable) -> Callable:
    """``inner_compile`` with Inductor's pooled reuse kept to short holds while it runs."""
    def compile_with_short_holds(*args, **kwargs):
        token = _SHORT_HOLDS.set(True)
        try:
            return inner_compile(*args, **kwargs)
        finally:
            _SHORT_HOLDS.reset(token)
    return compile_with_short_holds
