"""Masks that arrive at run time, proven causal (or causal AND a key mask, or empty) once per
mask tensor.

The pass proves a mask causal when the graph builds it from constants (see
``passes.match.causal_kind``). A mask that enters the graph as an input can't be proven there:
HF models under torch < 2.14 build their causal mask as a (B, 1, L, L) tensor while compiling
(they pass ``is_causal`` only when not compiling), and graph pieces hand it on as an input —
DDP's optimizer splits the forward at bucket bounds and FSDP2 breaks the graph at every
sharded block, so every decoder layer's graph receives the mask from the first one. Read
through the mask, a causal attention does twice the work (no block above the diagonal is
skipped) and reads L² mask entries per head.

So the op checks such a mask once: the check reads the mask and waits for the answer (a few
device syncs, in the first call that sees the tensor), and the answer is kept for that tensor
object, its version counter (an in-place write bumps it) and the graph's mask node the site
reads (Inductor may reuse a dead mask's buffer object for another node's mask), so that the
other layers of the step, and the backward, reuse it.
A causal mask runs as ``is_causal``; the causal mask of a padded batch (causal AND a per-key
mask, as transformers builds it) runs as ``is_causal`` with the (B, 1, 1, L) key mask, which
the kernels read as a vector per tile.
Only masks of shape (.., L, L) with L >= MIN_LEN are checked (there a causal skip halves the
work), and key masks (.., 1, Lk) at Lq >= MIN_LEN, proven empty when they keep every key (HF's
padding mask of a batch without padding: without it the kernels read no mask, and the
low-rank path, which takes none, is open; the op asks only where that changes the call, see
``op._key_mask_worth_proving``); never during CUDA graph capture (no sync allowed there) nor for inference-mode tensors
(they keep no version counter).

A mask built anew every call (T5's position bias, a padding mask) is a new tensor every call,
so the check would run every call. Two things keep that cheap where nothing can be proven:
the first query row is screened first (one row per batch and head, one sync: a provable
mask's first row keeps every key or none but the first), and a site whose masks failed
GIVE_UP times in a row stops checking (T5 at L = 4096 read its (1, 8, L, L) bias several
times a call and lost to stock: 0.66x, H100, eighth session). And a call whose attention is
small (under MIN_GFLOPS of forward work) is not checked at all: the check's host time and
syncs cost more than a masked kernel of that size (all-MiniLM-L6-v2 at L = 512, where every
layer's mask is a tensor of its own and was proven empty six times a call: 4.41 ms against
2.30 unchecked, stock 1.68; H100, eighth session). ``ADAATTN_RUN_TIME_MASKS=0`` turns the
checks off; ``ADAATTN_RUN_TIME_MASKS_MIN_GFLOPS`` moves the bar.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Optional, Tuple

import torch

MIN_LEN = 128
GIVE_UP = 2          # unprovable masks in a row after which a site stops checking
# Forward FLOPs (4 B H Lq Lk D) under which a call is not checked: Llama-1B's layer at B = 1,
# L = 2048 does 34 GFLOP (the mask, shared by its layers, proven once a step); BERT-base at
# L = 512 does 0.8
MIN_GFLOPS = float(os.environ.get("ADAATTN_RUN_TIME_MASKS_MIN_GFLOPS", "16") or 16)
_MAX_ENTRIES = 16   # distinct live masks remembered (a step passes one or two)

_lock = threading.Lock()
# (mask group, id(mask)) -> (weakref to the mask, its version when checked, kind, key mask or
# None); the weakref tells a live object from a new one that reuses a dead one's id
_proofs: "dict[tuple, tuple]" = {}
# site -> masks in a row found not provable there
_misses: "dict[str, int]" = {}


def enabled() -> bool:
    return os.environ.get("ADAATTN_RUN_TIME_MASKS", "") not in ("0", "false", "False", "no")


def _is_key_mask(mask: torch.Tensor, lq: int, lk: int) -> bool:
    """A per-key mask, (.., 1, Lk), for more than one query row."""
    return lq > 1 and mask.shape[-2:] == (1, lk)


def _checkable(mask: torch.Tensor, lq: int, lk: int) -> bool:
    if lq < MIN_LEN or mask.dim() < 2:
        return False
    if not (_is_key_mask(mask, lq, lk) or (lq == lk and mask.shape[-2:] == (lq, lk))):
        return False
    if mask.requires_grad or mask.is_inference():
        return False
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return mask.dtype == torch.bool or mask.is_floating_point()


def run_time_variants(mask: torch.Tensor, lq: int, lk: int, flops: float,
                      key_masks: bool = True) -> Tuple[Tuple[bool, bool], ...]:
    """What else than as written a call with ``mask`` may run as once its check has proven
    the mask, from the mask's shape and dtype alone (a fake tensor will do): (key mask kept,
    is_causal) pairs, none for a mask :func:`check` would not read. A key mask may prove empty
    (``key_masks``: whether the op checks this site's key masks; it does where the proof
    opens the low-rank path or gradients follow); a square one causal or empty (causal AND a
    key mask, a padded batch, is left out: its key mask is another tensor). For building
    kernels ahead of the first call (prebuild.py)."""
    if (not enabled() or lq < MIN_LEN or mask.dim() < 2 or flops < MIN_GFLOPS * 1e9
            or mask.requires_grad
            or not (mask.dtype == torch.bool or mask.is_floating_point())):
        return ()
    if _is_key_mask(mask, lq, lk):
        return ((False, False),) if key_masks else ()
    if lq == lk and tuple(mask.shape[-2:]) == (lq, lk):
        return ((False, True), (False, False))
    return ()


def _first_row_allows(mask: torch.Tensor) -> bool:
    """Whether the first query row of every (batch, head) could belong to a provable mask: it
    keeps every key ('none') or no key but the first (causal, causal AND a key mask), and an
    additive mask holds only 0 and very negative values there. One row read, one sync."""
    from .passes.match import VERY_NEGATIVE
    row = mask[..., 0, :]
    if mask.dtype == torch.bool:
        keep, valid = row, None
    else:
        keep = row == 0
        valid = (keep | (row <= VERY_NEGATIVE)).all()
    ok = keep.all() | ~keep[..., 1:].any()
    return bool(ok if valid is None else ok & valid)


def _keeps_every_key(mask: torch.Tensor) -> bool:
    """Whether a key mask keeps every key: all True, or all 0 added. One sync."""
    return bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all())


def _prove(mask: torch.Tensor, n: int) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """(kind, key mask) of an (.., n, n) mask, see :func:`run_time_kind`."""
    from .passes.match import VERY_NEGATIVE, causal_kind
    kind = causal_kind(mask, n, n, True if mask.dtype == torch.bool else None)
    if kind is not None:
        return kind, None
    # causal AND a per-key mask (HF's causal mask of a padded batch: keep[b, i, j] = j <= i and
    # not padding[b, j]): the last query row sees every key under a causal mask, so it *is*
    # the key mask
    tril = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    keys = mask[..., -1:, :]
    if mask.dtype == torch.bool:
        proven = bool((mask == (tril & keys)).all())
    else:
        dropped = mask <= VERY_NEGATIVE
        proven = bool(torch.where(tril, mask == keys, dropped).all())
        # ... and every row keeps a key under the diagonal: a row with only very negative
        # values would spread its weight over the keys above the diagonal too (eager's
        # softmax of equal values), which the causal run leaves out
        proven = proven and bool(
            (torch.where(tril, mask, float("-inf")).amax(-1) > VERY_NEGATIVE).all())
    if not proven:
        return None, None
    return "causal+keys", keys.contiguous()


def run_time_kind(mask: Optional[torch.Tensor], lq: int, lk: int,
                  site: Optional[str] = None) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """:func:`check` without its third value."""
    return check(mask, lq, lk, site)[:2]


def check(mask: Optional[torch.Tensor], lq: int, lk: int, site: Optional[str] = None,
          flops: Optional[float] = None,
          group: Optional[str] = None) -> Tuple[Optional[str], Optional[torch.Tensor], bool]:
    """(kind, mask to run with): 'causal' if ``mask`` is SDPA's top-left causal mask (bool
    keep-mask, or additive with 0 kept and very negative dropped) and 'none' if it masks
    nothing (no mask to run with); 'causal+keys' if it is the causal mask AND a per-key mask,
    which comes back as a (.., 1, Lk) tensor to run with is_causal; (None, None) otherwise
    (also for masks not checked, see the module doc); third: whether this call checked the
    mask and found it not provable. ``site``: the attention site asking; one that has seen
    GIVE_UP unprovable masks in a row checks no more. ``flops``: the call's forward work; a
    call under MIN_GFLOPS is not checked (a proof kept for this tensor still counts).
    ``group``: the graph's mask node the site reads (``op.set_mask_group``): a proof is kept
    for the tensor *and* the node. Inductor may hand a dead mask's buffer object, written anew
    by its kernels without a version bump, to a later node (a per-layer mask of the same
    shape); keyed by the tensor alone, that mask would take the first one's proof."""
    if mask is None or not _checkable(mask, lq, lk) or not enabled():
        return None, None, False
    key, version = (group, id(mask)), mask._version
    entry = _proofs.get(key)
    if entry is not None and entry[0]() is mask and entry[1] == version:
        return entry[2], entry[3], False
    if site is not None and _misses.get(site, 0) >= GIVE_UP:
        return None, None, False
    if flops is not None and flops < MIN_GFLOPS * 1e9:
        return None, None, False
    if _is_key_mask(mask, lq, lk):   # (a padding mask that pads nothing: no mask)
        kind, keys = ("none" if _keeps_every_key(mask) else None), None
    else:
        kind, keys = _prove(mask, lq) if _first_row_allows(mask) else (None, None)
    with _lock:
        if site is not None:
            _misses[site] = _misses.get(site, 0) + 1 if kind is None else 0
        if len(_proofs) >= _MAX_ENTRIES:
            # drop the dead entries first, then the oldest
            for k in [k for k, e in _proofs.items() if e[0]() is None]:
                del _proofs[k]
            while len(_proofs) >= _MAX_ENTRIES:
                del _proofs[next(iter(_proofs))]
        # (the key mask is a small copy: it keeps no reference to the mask itself)
        _proofs[key] = (weakref.ref(mask), version, kind, keys)
    return kind, keys, kind is None


def given_up(site: str) -> bool:
    """Whether ``site`` has stopped checking its masks (GIVE_UP unprovable in a row)."""
    return _misses.get(site, 0) >= GIVE_UP


def clear() -> None:
    with _lock:
        _proofs.clear()
        _misses.clear()
