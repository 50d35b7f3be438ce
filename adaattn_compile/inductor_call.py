"""Inductor's wrapper code calls the op's Python body directly, not through the dispatcher.

Inductor lowers ``adaattn::attention`` as a fallback kernel: its generated wrapper (the Python
function that runs a compiled graph) calls ``torch.ops.adaattn.attention.default(...)``, a
round trip through the C++ dispatcher into our Python kernels that costs more host time than
torch's own SDPA call (op.py, "Inductor's direct call"). Here Inductor's fallback lowering for
the op is wrapped: the fallback kernel it makes is the same (layout constraint, outputs,
asserts), but the name it is called by in the Python wrapper is
``op.inductor_attention_out_only`` where the graph reads only the output (inference) and
``op.inductor_attention`` elsewhere; both go through the dispatcher whenever it could do more
than reach our kernel. The C++ wrapper and the FX wrapper keep the operator.

``ADAATTN_DIRECT_CALL=0`` (read when a graph is compiled) keeps the operator's name.
"""
from __future__ import annotations

import logging
import operator
import os
import threading

import torch

log = logging.getLogger("adaattn")

# (aliases the wrapper module imports the entry points under)
_ENTRY_POINTS = {True: ("inductor_attention_out_only", "_adaattn_attention_out_only"),
                 False: ("inductor_attention", "_adaattn_attention")}
_install_lock = threading.Lock()
_installed = None   # None: not tried; else whether the lowering is ours


def enabled() -> bool:
    return os.environ.get("ADAATTN_DIRECT_CALL", "1") != "0"


def install() -> bool:
    """Wrap Inductor's lowering of ``adaattn::attention`` (once a process). -> whether the
    lowering is ours; False (the operator called as before) where Inductor's internals are
    not those this was written against (torch 2.11 and 2.13)."""
    global _installed
    with _install_lock:
        if _installed is None:
            try:
                _installed = _install()
            except Exception as exc:   # (an optimisation only)
                log.debug("adaattn: Inductor calls the operator (%s: %s)",
                          type(exc).__name__, exc)
                _installed = False
        return _installed


def _install() -> bool:
    from torch._inductor import ir, lowering
    from torch._inductor.virtualized import V
    from torch._library.utils import get_layout_constraint_tag

    target = torch.ops.adaattn.attention.default
    if target not in lowering.lowerings:
        # What GraphLowering.call_function does for a custom op it has no lowering for (the
        # flexible_layout tag's constraint: none)
        lowering.make_fallback(target, layout_constraint=lowering.tag_to_layout_constraint(
            get_layout_constraint_tag(target, with_default=True)))
    fallback = lowering.lowerings[target]
    if not getattr(fallback, "_is_fallback_handler", False):
        return False   # (someone else's lowering: left alone)

    def lower(*args, **kwargs):
        operations = V.graph.operations
        first_new = len(operations)
        result = fallback(*args, **kwargs)
        kernels = [node for node in operations[first_new:]
                   if isinstance(node, ir.FallbackKernel) and node.op_overload is target]
        if len(kernels) == 1 and enabled():
            _call_directly(kernels[0], _reads_out_only(V.graph.current_node), V)
        return result

    lower._is_fallback_handler = True   # (Inductor tells fallbacks by it)
    lower._adaattn_direct = True
    lowering.lowerings[target] = lower
    return True


def _reads_out_only(node) -> bool:
    """Whether the graph reads only element 0 (out) of the op's FX ``node``'s result."""
    if node is None or not node.users:
        return False
    return all(user.target is operator.getitem and user.args[1] == 0 for user in node.users)


def _call_directly(kernel, out_only: bool, V) -> None:
    """Name ``kernel`` (Inductor's fallback kernel for one call) by our entry point when the
    Python wrapper generates its call. Decided at code generation: only then is the wrapper
    known (the C++ and FX wrappers keep the operator)."""
    name, alias = _ENTRY_POINTS[out_only]
    generic_codegen = type(kernel).codegen

    def codegen(wrapper):
        if (not getattr(V.graph, "cpp_wrapper", False) and not getattr(V.graph, "fx_wrapper", False)
                and hasattr(wrapper, "add_import_once")):
            wrapper.add_import_once(f"from adaattn_compile.op import {name} as {alias}")
            kernel.python_kernel_name = alias
        generic_codegen(kernel, wrapper)

    kernel.codegen = codegen
