"""Direct launches of compiled Triton kernels, skipping ``JITFunction.run`` after the first call.

In triton 3.6 a launch of an autotuned kernel through ``kernel[grid](...)`` took ~140 us of
host time under cProfile on the H100 machine (autotuner lookup, argument binding, the cache-key
string, the launch metadata), against ~21 us for a whole SDPA call. A small attention call
(batch 1, GPT-2 sizes) runs its kernel in less, so that host time was the call's time
(2026-11-25: our op 377 us a call before this module, 118 us with it).

:func:`launch` goes through Triton (compile, autotune) the first time it sees a
*specialisation* (what Triton keys its compiled kernels and autotune choices on: tensor dtypes
and 16-byte alignment, int arguments' ``== 1`` / ``% 16`` / 32-bit facts, constexpr values),
remembers the compiled kernel and the chosen config, and from then on calls the compiled
launcher itself. Kernels with descriptor arguments or autotune pre-hooks are not handled here
(their launches do work between binding and launch): call them the usual way. Used by
``flash.flash_forward``'s Triton forward and ``flash.flash_backward``'s three kernels (checked
on the H100: ``tests/test_flash_fast_path.py`` runs the direct and bound launches against a
float64 reference). :func:`bind` hands out a specialisation's :class:`Bound` launch, for callers
that key it on everything its non-tensor arguments follow from.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Sequence

import torch

try:  # the launch hooks live in triton.knobs from triton 3.4 on
    from triton import knobs as _knobs
except Exception:  # pragma: no cover - older triton: no direct launches
    _knobs = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false", "False")
# turned off for the process by ADAATTN_DIRECT_LAUNCH=0, or by the first failure (another
# triton's launcher API): every launch then goes through triton as before
_ENABLED = (_knobs is not None and not _INTERPRET
            and os.environ.get("ADAATTN_DIRECT_LAUNCH", "1") not in ("0", "false", "False", "no"))

# CLaunch (below) off with ADAATTN_C_LAUNCH=0; where it is on, bound launches of kernels with
# triton 3.6's launcher skip its Python wrappers (read at each launch: scripts turn it off to
# compare)
_C_LAUNCH = os.environ.get("ADAATTN_C_LAUNCH", "1") not in ("0", "false", "False", "no")


def enabled() -> bool:
    """Whether direct launches are on (off for the process after the first failure)."""
    return _ENABLED


class _Plan:
    """What one specialisation needs to launch: the compiled kernel, the full argument list
    with the constexpr and config values filled in, and the values the grid may read."""
    __slots__ = ("kernel", "values", "meta")

    def __init__(self, kernel, values, meta):
        self.kernel, self.values, self.meta = kernel, values, meta


def hooks():
    """Triton's launch enter / exit hooks, None where none is set (in triton 3.6 they are
    ``HookChain`` objects, always truthy: an empty chain would still be called, and make us
    build the launch metadata it is given, on every launch)."""
    rt = _knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    if enter is not None and not getattr(enter, "calls", True):
        enter = None
    if leave is not None and not getattr(leave, "calls", True):
        leave = None
    return enter, leave


def _stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


current_stream = _stream   # (for callers that launch through CLaunch)


def _spec(x):
    """What Triton specialises a runtime argument on (plus the type, so that a float and an
    int never share an entry)."""
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.data_ptr() % 16 == 0)
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return (x == 1, x % 16 == 0, -2**31 <= x < 2**31)
    if isinstance(x, float):
        return float
    raise TypeError(type(x).__name__)


class _Signature:
    """The kernel's parameters: names, which are constexpr, their defaults."""

    def __init__(self, fn, jit_fn):
        self.fn = fn   # held so that its id (the plans' key) is never reused by another object
        params = jit_fn.params
        self.names = [p.name for p in params]
        self.constexpr = [bool(p.is_constexpr) for p in params]
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.index = {n: i for i, n in enumerate(self.names)}


_SIGNATURES: Dict[int, _Signature] = {}
_OPTIONS = ("num_warps", "num_stages")
_PLANS: Dict[Any, _Plan] = {}


def _jit_of(fn):
    """The JITFunction under an autotuner (or the function itself)."""
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def launch(fn, grid: Callable[[Dict[str, Any]], Sequence[int]], args: Sequence[Any],
           kwargs: Dict[str, Any], device: torch.device):
    """``fn[grid](*args, **kwargs)``, directly once this specialisation has been launched.

    ``fn``: a ``@triton.jit`` function or a ``triton.autotune`` wrapper of one (no pre-hooks,
    no descriptor arguments). ``grid``: a function of the kernel's constexpr and config values
    (``meta["BLOCK_M"]``); anything else it needs, it closes over.
    """
    global _ENABLED
    if not _ENABLED:
        return fn[grid](*args, **kwargs)
    sig = _SIGNATURES.get(id(fn))
    if sig is None:
        sig = _SIGNATURES[id(fn)] = _Signature(fn, _jit_of(fn))
    # compile options (num_warps, num_stages) are no kernel parameters: the compiled kernel
    # holds them, so they only key the plan
    options = {n: kwargs[n] for n in _OPTIONS if n in kwargs}
    if options:
        kwargs = {n: v for n, v in kwargs.items() if n not in options}
    dev = device.index if device.index is not None else torch.cuda.current_device()
    key = _key(fn, sig, dev, args, kwargs)
    if key is None:   # an argument kind we do not know how Triton specialises
        return fn[grid](*args, **kwargs, **options)
    if options:
        key = key + (tuple(options.items()),)
    plan = _PLANS.get(key)
    if plan is None:
        kernel = fn[grid](*args, **kwargs, **options)
        _remember(fn, sig, key, kernel, args, kwargs)
        return kernel
    values = _fill(plan, sig, args, kwargs)
    try:
        run_compiled(plan.kernel, tuple(grid(plan.meta)) + (1, 1), dev, values)
    except Exception as exc:
        _ENABLED = False
        warnings.warn(f"adaattn: direct kernel launch failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); launching through triton from now on")
        return fn[grid](*args, **kwargs, **options)
    return plan.kernel


def _key(fn, sig: "_Signature", dev: int, args, kwargs):
    """The plans' key of a launch (what Triton specialises on), None for an argument kind
    :func:`_spec` does not know."""
    constexpr, index = sig.constexpr, sig.index
    try:
        return (id(fn), dev,
                tuple(a if constexpr[i] else _spec(a) for i, a in enumerate(args)),
                tuple((n, v if constexpr[index[n]] else _spec(v)) for n, v in kwargs.items()))
    except TypeError:
        return None


def _fill(plan: "_Plan", sig: "_Signature", args, kwargs) -> list:
    """The plan's full argument list with this launch's arguments in their places."""
    values = list(plan.values)
    values[:len(args)] = args
    for n, v in kwargs.items():
        values[sig.index[n]] = v
    return values


def run_compiled(kernel, grid: Sequence[int], device_index: int, values: Sequence[Any]) -> None:
    """Launch a compiled Triton kernel on the current stream of ``device_index`` with its
    full argument list (what ``JITFunction.run`` ends with), calling triton's launch hooks
    where any are set. ``grid``: three ints."""
    g0, g1, g2 = grid[:3]
    stream = _stream(device_index)
    enter, leave = hooks()
    meta = kernel.launch_metadata((g0, g1, g2), stream, *values) if enter else None
    kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, meta,
               enter, leave, *values)


class Bound:
    """One specialisation's launch with everything but its tensors fixed: the compiled
    kernel, the grid and the argument list. ``bound(*tensors)`` launches with ``tensors`` in
    the first positions of the argument list (the positions that were tensors when it was
    made). For callers that key it on everything the rest of the arguments follow from
    (shapes, strides, dtypes, alignment, flags): ``flash.flash_forward``'s per-call fast path."""
    __slots__ = ("kernel", "grid", "values", "device", "c_launch")

    def __init__(self, kernel, grid, values, device, c_launch=None):
        self.kernel, self.grid, self.values, self.device = kernel, grid, values, device
        self.c_launch = c_launch   # (a CLaunch: the kernel has no descriptor arguments)

    def __call__(self, *tensors, mask_group=None, mask_owner=None):
        values = list(self.values)
        values[:len(tensors)] = tensors
        c = self.c_launch
        if c is not None and _C_LAUNCH and hooks() == _NO_HOOKS:
            c(self.grid, _stream(self.device), values)
        else:
            run_compiled(self.kernel, self.grid, self.device, values)


_NO_HOOKS = (None, None)


class CLaunch:
    """One compiled kernel launched through triton 3.6's C launcher (the generated module's
    ``launch``) with its Python wrappers skipped: ``CudaLauncher.__call__`` (two scratch
    allocations, None for kernels that ask for no scratch) and ``wrap_handle_tensordesc``'s
    ``inner`` (a loop over every argument that encodes a fresh tensor map for each host
    descriptor, on every launch). Descriptor arguments are expanded by :meth:`descriptor` as
    triton expands them (the tensor map, then the shape and strides); their tensor maps are
    kept by base address, which, with the layout fixed by the caller's key, is all a map
    encodes (callers pass one layout per position). Build with :func:`c_launcher`; a launch
    with triton's enter / exit hooks set goes through triton instead (callers check
    :func:`hooks`). On the H100 (2026-11-27, ``scripts/launch_cost.py``, B=1, H=12, L=4096,
    D=64) a bound launch of the sm90 forward took 13.0 us of host time this way against 23.0
    through triton's wrappers, and the op's whole call 61.2 against 81.4 (SDPA's: 25.4)."""
    __slots__ = ("_launch", "_head", "_meta", "_maps", "_fill", "_dtype_to_host")
    _MAPS_LIMIT = 64   # tensor maps kept per descriptor position (then all dropped)

    def __init__(self, c_launch, function, packed_metadata, cooperative, pdl, meta, fill,
                 dtype_to_host):
        self._launch = c_launch
        self._head = (function, cooperative, pdl, None, None, packed_metadata, None, None, None)
        self._meta = meta                      # descriptor position -> triton's tensordesc_meta
        self._maps = {i: {} for i in meta}     # descriptor position -> {base address: expansion}
        self._fill = fill
        self._dtype_to_host = dtype_to_host

    @property
    def descriptor_positions(self) -> frozenset:
        return frozenset(self._meta)

    def descriptor(self, position: int, t: torch.Tensor, shape, strides) -> tuple:
        """The launcher's arguments for a host descriptor of ``t`` at argument ``position``."""
        maps = self._maps[position]
        ptr = t.data_ptr()
        got = maps.get(ptr)
        if got is None:
            m = self._meta[position]
            tensor_map = self._fill(ptr, m["swizzle"], m["elem_size"],
                                    self._dtype_to_host[m["elem_type"]], m["block_size"],
                                    shape, strides, 0)   # padding 0: out-of-bounds reads are zeros
            if len(maps) >= self._MAPS_LIMIT:
                maps.clear()
            got = maps[ptr] = (tensor_map, *shape, *strides)
        return got

    def __call__(self, grid, stream: int, args) -> None:
        """Launch on ``stream`` with ``args``: the kernel's arguments in order, each descriptor
        as :meth:`descriptor`'s tuple spread in its place."""
        self._launch(grid[0], grid[1], grid[2], stream, *self._head, *args)


# The shape of triton 3.6's CUDA launcher that CLaunch relies on: CudaLauncher.launch is either
# the C launch itself (no descriptor arguments) or wrap_handle_tensordesc's `inner`, closing over
# the C launch, the descriptor positions and their metadata.
_INNER_FREEVARS = frozenset(("launcher", "tensordesc_indices", "tensordesc_meta"))
_BASE_ARGS = 13   # grid (3), stream, function, cooperative, pdl, scratch, metadata, hooks (2 each)


def c_launcher(kernel) -> "CLaunch | None":
    """A :class:`CLaunch` for a compiled kernel (``JITFunction.run``'s result) if its launcher
    has the shape of triton 3.6's CUDA launcher, else None (another triton: the caller keeps
    :func:`run_compiled`). ADAATTN_C_LAUNCH=0 turns it off."""
    if not _C_LAUNCH:
        return None
    try:
        run = kernel.run   # (initialises the kernel's handles)
        if type(run).__name__ != "CudaLauncher" or run.num_ctas != 1:
            return None
        if run.global_scratch_size or run.profile_scratch_size:
            return None   # (scratch is allocated per launch by CudaLauncher.__call__)
        fn = run.launch
        meta: Dict[int, dict] = {}
        code = getattr(fn, "__code__", None)
        if code is not None:   # inner: descriptor arguments
            if frozenset(code.co_freevars) != _INNER_FREEVARS:
                return None
            cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))
            g = fn.__globals__
            if g.get("_BASE_ARGS_FORMAT_LEN") != _BASE_ARGS:
                return None
            make = g.get("make_tensordesc_arg")
            if make is None or make.__code__.co_argcount != 2:
                return None   # (triton 3.6's make_tensordesc_arg(arg, metadata))
            positions = sorted(cells["tensordesc_indices"])
            metas = cells["tensordesc_meta"]
            if len(metas) != len(positions):
                return None
            for i, m in zip(positions, metas):
                if m is None or m.get("fp4_padded"):
                    return None   # (decomposed or fp4 descriptors: not expanded here)
                meta[i] = m
            c_launch = cells["launcher"]
            fill = g["triton"].runtime.driver.active.utils.fill_tma_descriptor
            dtype_to_host = g["TMA_DTYPE_DEVICE_TO_HOST"]
        else:
            c_launch, fill, dtype_to_host = fn, None, None
        if not callable(c_launch) or hasattr(c_launch, "__code__"):
            return None   # (the C function itself, not another Python wrapper)
        return CLaunch(c_launch, kernel.function, kernel.packed_metadata,
                       run.launch_cooperative_grid, run.launch_pdl, meta, fill, dtype_to_host)
    except Exception:   # anything unexpected: the usual launch
        return None


def bind(fn, grid: Callable[[Dict[str, Any]], Sequence[int]], args: Sequence[Any],
         kwargs: Dict[str, Any], device: torch.device):
    """The :class:`Bound` launch of ``fn[grid](*args, **kwargs)`` if :func:`launch` has a plan
    for its specialisation (it has once it launched it), else None. ``args`` start with the
    tensors :class:`Bound` will be given; the grid is evaluated here, once: the caller's key
    must determine it."""
    if not _ENABLED:
        return None
    sig = _SIGNATURES.get(id(fn))
    if sig is None:
        return None
    dev = device.index if device.index is not None else torch.cuda.current_device()
    key = _key(fn, sig, dev, args, kwargs)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        return None
    values = _fill(plan, sig, [None if isinstance(a, torch.Tensor) else a for a in args], kwargs)
    g = tuple(grid(plan.meta)) + (1, 1)
    c = c_launcher(plan.kernel)
    if c is not None and c.descriptor_positions:
        c = None   # (Bound passes no descriptors)
    return Bound(plan.kernel, g[:3], tuple(values), dev, c)


def _remember(fn, sig: _Signature, key, kernel, args, kwargs) -> None:
    """Record the launch plan of a specialisation just launched through triton."""
    if not (hasattr(kernel, "run") and hasattr(kernel, "function")
            and hasattr(kernel, "packed_metadata")):
        return
    config = getattr(fn, "best_config", None)
    if config is not None and config.pre_hook is not None:
        return   # a launch with hooks: leave it to triton
    bound: Dict[str, Any] = dict(sig.defaults)
    bound.update(zip(sig.names, args))
    bound.update(kwargs)
    if config is not None:
        bound.update(config.kwargs)
    if any(n not in bound for n in sig.names):
        return
    meta = {n: bound[n] for n, c in zip(sig.names, sig.constexpr) if c}
    # tensors are this call's: every later call passes its own in their place, and keeping
    # them here would hold the first call's buffers alive for the life of the process
    values = [None if isinstance(bound[n], torch.Tensor) else bound[n] for n in sig.names]
    _PLANS[key] = _Plan(kernel, values, meta)


def clear() -> None:
    """Forget every plan (tests; a changed autotune setting)."""
    _PLANS.clear()
    _SIGNATURES.clear()


def drop_compiled(jit_fn) -> None:
    """Forget what triton compiled for ``jit_fn`` in this process (its per-device kernel caches:
    ``device_caches`` in triton 3.x, ``cache`` before), so that the next launch compiles again
    (or loads triton's disk cache). No-op for objects without them (the interpreter's)."""
    for name in ("device_caches", "cache"):
        caches = getattr(jit_fn, name, None)
        if isinstance(caches, dict):
            caches.clear()
