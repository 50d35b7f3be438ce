"""The ``adaattn`` torch.compile backend: find attention, rewrite it, hand the rest on.

Kept pure: Dynamo may call a backend several times for one frame (dynamic-shape restarts),
so each call works only on the graph it is given and records what it did. If our pass raises,
the graph is compiled unchanged and one warning says so: matching must never cost a model.
"""
from __future__ import annotations

import copy
import itertools
import logging
import operator
import threading
import time
import warnings
from typing import Callable, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import inductor_call, inductor_memory, mask_proofs, op, prebuild
from .passes import mha, relative_bias
from .options import Options
from .passes.graph_utils import hint, location, meta
from .passes.match import AttentionMatch, find_attention
from .passes.rewrite import erase_dead, insert_node, new_site_id, rewrite_site
from .passes.share_masks import copy_shared_strided_masks, share_mask_computations
from .report import Decision, GraphRecord, Site, SkippedSite

log = logging.getLogger("adaattn")

_graph_ids = itertools.count()
_recorders: List[List[GraphRecord]] = []
_recorders_lock = threading.Lock()


def reset_ids() -> None:
    """Number graphs and sites from 0 again (for reproducible reports in tests)."""
    global _graph_ids
    from .passes import rewrite
    _graph_ids = itertools.count()
    rewrite._site_ids = itertools.count()
    mask_proofs.clear()   # (what it learnt per site belongs to the sites numbered before)


def rewrite_graph(gm: fx.GraphModule, options: Options, name: str,
                  original: Optional[list] = None, training: bool = False) -> GraphRecord:
    """Match and rewrite every attention site of ``gm`` in place; never raises. ``original``
    (a list) receives a copy of the graph as it came. ``training``: gradients will be taken
    through the graph (its sites plan exact attention: the low-rank path is inference-only)."""
    record = GraphRecord(name=name, code_before=gm.code)
    start = time.perf_counter()
    backup = _copy_graph(gm.graph)
    if original is not None:
        original.append(backup)   # (left as it came: only a failed rewrite takes it)
    try:
        matches, skipped = find_attention(gm)
        record.skipped = [SkippedSite(name, s.location, s.what, s.reason) for s in skipped]
        dead, replaced = [], {}
        for m in matches:
            site_id = new_site_id()
            call = rewrite_site(gm, m, site_id, options.policy, options.kernel, replaced)
            op.register_site(site_id, options, training)
            site = _describe_site(m, call, site_id, name, options, training)
            if site.decision.kernel == "sdpa":
                _to_torch_sdpa(gm, call, replaced)
            record.sites.append(site)
            dead += m.chain + [m.out_node]
        for node in list(gm.graph.nodes):
            if not mha.is_mha(node):
                continue
            try:
                mha_match = mha.match_mha(node)
            except ValueError as why:
                record.skipped.append(SkippedSite(name, location(node), "nn.MultiheadAttention",
                                                  str(why)))
                continue
            site_id = new_site_id()
            mha.rewrite_mha(mha_match, site_id, options.policy, options.kernel)
            op.register_site(site_id, options, training)
            record.sites.append(_describe_mha(mha_match, site_id, name, options, training))
        erase_dead(gm, dead)
        if record.sites:
            share_mask_computations(gm)
            # (after the merge: the layers' copies of one bias are one node, one table)
            tabled = set(relative_bias.relative_bias_tables(gm, training))
            for site in record.sites:
                if site.id in tabled:
                    site.notes += (relative_bias.NOTE,)
            copy_shared_strided_masks(gm)
            _register_mask_groups(gm, name)
        gm.graph.lint()
        gm.recompile()
    except Exception as exc:  # never break a model: compile the original graph
        gm.graph = backup
        gm.recompile()
        record.sites = []
        record.error = f"{type(exc).__name__}: {exc}"
        message = (f"adaattn: rewriting {name} failed ({record.error}); "
                   "its attention runs as written")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    record.pass_seconds = time.perf_counter() - start
    record.code_after = gm.code
    return record


def _register_mask_groups(gm: fx.GraphModule, name: str) -> None:
    """Tell the op which of this graph's sites read the same mask node (one value per graph
    call): what a kernel derives from a mask (the Gluon forward's bias tile) is then built once
    per graph call for all of them, not once per site (BERT: 12 layers, one padding mask)."""
    target = torch.ops.adaattn.attention.default
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is target:
            mask = node.args[3]
            op.set_mask_group(node.args[8], f"{name}/{mask.name}"
                              if isinstance(mask, fx.Node) else None)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy to restore if the rewrite fails. Dynamo keeps facts on placeholder nodes as plain
    attributes (``_dynamo_source``) that Graph copies drop: carry them over."""
    backup = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, backup.nodes):
        for attr, value in vars(old).items():
            if attr.startswith("_dynamo"):
                setattr(new, attr, value)
    return backup


def _static_like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A fake tensor like ``t`` with its sizes replaced by their hints, so that planning for the
    report reads shapes without installing guards on dynamic dims."""
    if t is None:
        return None
    mode = getattr(t, "fake_mode", None)
    shape = tuple(hint(s) for s in t.shape)
    if mode is None:
        return torch.empty(shape, dtype=t.dtype, device="meta")
    with mode:
        return torch.empty(shape, dtype=t.dtype, device=t.device)


def _describe_site(m: AttentionMatch, call: fx.Node, site_id: str, graph: str,
                   options: Options, training: bool = False) -> Site:
    fakes = [meta(a) for a in call.args[:4]]
    if any(t is None for t in fakes[:3]):
        errors = [a.meta.get("adaattn_fake_error") for a in call.args[:3] if isinstance(a, fx.Node)]
        raise RuntimeError(f"lost shape metadata while rewriting ({errors})")
    dynamic = not all(isinstance(s, int) for t in fakes[:3] for s in t.shape)
    q, k, v, mask = (_static_like(t) for t in fakes)
    unsupported = lowrank_why = int8_why = None
    if options.kernel != "reference":
        try:
            unsupported = op._flash_unsupported(q, k, v, mask, m.dropout_p, m.enable_gqa)
            lowrank_why = op.lowrank_unsupported(q, k, v, mask, m.causal, m.dropout_p,
                                                 m.enable_gqa)
            if op.wants_int8(options):
                int8_why = op.int8_unsupported(q, k, v, mask, m.dropout_p, m.enable_gqa)
        except Exception as exc:
            unsupported = f"kernel check failed: {exc}"
    problem = op.problem_of(q, k, v, mask, m.causal, m.dropout_p, m.enable_gqa, unsupported,
                            lowrank_why, training, int8_why)
    info = op.device_info(q.device) if q.device.type != "meta" else op.planner.DeviceInfo("meta")
    chosen = op.planner.plan(info, problem, options)
    decision = Decision(chosen.kernel, chosen.precision, chosen.rank, chosen.guards,
                        chosen.reason, site_id, chosen.precisions)
    if not dynamic and info.type == "cuda":
        gflops = op.planner.forward_flops(q.shape, k.shape[-2], m.causal) / 1e9
        # (torch's SDPA refuses an explicit mask together with is_causal=True: T5's decoder)
        sdpa_takes_it = m.dropout_p == 0 and (mask is None or (
            mask.dtype in (torch.bool, q.dtype) and not m.causal))
        why = op.planner.small_call(info, problem, options, gflops, sdpa_takes_it)
        if why is not None:
            decision = Decision("sdpa", chosen.precisions[-1], "dense", chosen.guards, why,
                                site_id, chosen.precisions[-1:])
    notes = tuple(m.notes)
    if call.kwargs.get("out_blhd"):
        notes += ("out written as (B, L, H, D): the heads' transpose after it is a view",)
    return Site(
        id=site_id, graph=graph, pattern=m.pattern, location=m.location,
        q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
        dtype=str(q.dtype).replace("torch.", ""), causal=m.causal, mask=op.mask_kind(mask),
        scale=m.scale, dropout_p=m.dropout_p, gqa_groups=m.gqa_groups,
        decision=decision, notes=notes, dynamic=dynamic)


def _to_torch_sdpa(gm: fx.GraphModule, call: fx.Node, replaced: dict) -> None:
    """Swap an op call just inserted for torch's SDPA on the same (q, k, v, mask, ...): the
    site is too small for our op (see planner.small_call). Inductor then treats it as stock
    torch.compile would."""
    q, k, v, mask, dropout_p, causal, scale, gqa = call.args[:8]
    kwargs = {"attn_mask": mask, "dropout_p": dropout_p, "is_causal": causal, "scale": scale}
    if gqa:
        kwargs["enable_gqa"] = True
    with gm.graph.inserting_before(call):
        sdpa = gm.graph.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs)
    for user in list(call.users):
        if user.target is operator.getitem and user.args[1] == 1:
            # the lse, read only to find the rows with every key masked (see
            # rewrite._eager_masked_rows): SDPA returns none, the mask tells them
            with gm.graph.inserting_before(user):
                user.replace_all_uses_with(_dead_rows_as_lse(gm.graph, mask))
            gm.graph.erase_node(user)
            continue
        if not (user.target is operator.getitem and user.args[1] == 0):
            raise RuntimeError(f"unexpected use of the op's results: {user.format_node()}")
        sdpa.meta.update(user.meta)   # (out's fake value, stack trace, module stack)
        user.replace_all_uses_with(sdpa)
        for key, value in replaced.items():
            if value is user:
                replaced[key] = sdpa
        gm.graph.erase_node(user)
    gm.graph.erase_node(call)


def _dead_rows_as_lse(graph: fx.Graph, mask) -> fx.Node:
    """-inf where a query row has every key masked, else 0 (an lse stand-in, broadcastable to
    the output's rows). The sites that read it are masked by fills alone (see
    match._masked_rows), so their mask is a bool keep mask; SDPA's path takes no causal one."""
    live = insert_node(graph, "call_method", "any", (mask, -1))
    return insert_node(graph, "call_function", torch.where, (live, 0.0, float("-inf")))


def _describe_mha(m, site_id: str, graph: str, options: Options, training: bool = False) -> Site:
    q = meta(m.node.args[0])
    dtype = str(q.dtype).replace("torch.", "")
    shapes = [tuple(hint(s) for s in shape) for shape in (m.q_shape, m.k_shape, m.v_shape)]
    info = op.device_info(q.device)
    problem = op.planner.Problem(dtype=dtype, q_len=shapes[0][2], k_len=shapes[1][2],
                                 head_dim=shapes[0][3], v_head_dim=shapes[2][3], mask=m.mask,
                                 causal=m.causal, dropout_p=m.dropout_p,
                                 kernel_unsupported="dropout runs on the reference path"
                                 if m.dropout_p > 0 else None, training=training)
    chosen = op.planner.plan(info, problem, options)
    return Site(id=site_id, graph=graph, pattern=m.pattern, location=m.location,
                q_shape=shapes[0], k_shape=shapes[1], v_shape=shapes[2], dtype=dtype,
                causal=m.causal, mask=m.mask, scale=None, dropout_p=m.dropout_p, gqa_groups=1,
                decision=Decision(chosen.kernel, chosen.precision, chosen.rank, chosen.guards,
                                  chosen.reason, site_id, chosen.precisions),
                notes=("projections and mask merging stay torch's",),
                dynamic=not all(isinstance(s, int) for s in (*m.q_shape, *m.k_shape)))


def inductor_config_for_mode(mode: Optional[str]) -> dict:
    """Inductor's config for ``torch.compile``'s ``mode`` (torch passes it to any backend; ours
    compiles with Inductor, which takes it as it would from stock torch.compile: CUDA graphs
    under "reduce-overhead", autotuned GEMMs under "max-autotune"). Under CUDA graphs our op
    is left out of them (it is tagged ``cudagraph_unsafe``: its host-side plans and checks
    must run every call), and Inductor's graph partition captures what lies between calls."""
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options
    modes = list_mode_options()
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"adaattn backend: bad value {mode!r} for argument 'mode'; allowed: "
                         f"{', '.join(repr(m) for m in sorted({'default', *modes}))}")
    return dict(list_mode_options(mode))


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str,
                  mode: Optional[str] = None) -> Callable:
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        inductor_call.install()
        # (pooled buffer reuse kept to short holds: see inductor_memory)
        memory_patches, wrap_inner = inductor_memory.compile_settings()
        patches = {**memory_patches, **inductor_config_for_mode(mode)}
        kwargs = {"config_patches": patches} if patches else {}
        if wrap_inner is not None:
            kwargs["inner_compile"] = wrap_inner(compile_fx_inner)
        return compile_fx(gm, example_inputs, **kwargs)
    if mode not in (None, "default"):
        warnings.warn(f"adaattn backend: mode={mode!r} is Inductor's; inner={inner!r} "
                      "compiles without it", RuntimeWarning, stacklevel=3)
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    return gm.forward


class AdaAttnBackend:
    """A backend callable bound to validated options (``adaattn_compile.backend(**options)``)."""

    def __init__(self, options: Options, recorder: Optional[List[GraphRecord]] = None):
        self.options = options
        self.recorder = recorder

    def __call__(self, gm: fx.GraphModule, example_inputs, **kwargs):
        options = self.options
        if kwargs.get("options") is not None:
            options = Options.parse({**dataclass_dict(self.options), **kwargs.pop("options")})
        mode = kwargs.pop("mode", None)
        if kwargs:
            raise TypeError(f"adaattn backend: unexpected argument(s) {sorted(kwargs)}")
        return compile_graph(gm, example_inputs, options, self.recorder, mode)

    def __repr__(self) -> str:
        return f"adaattn_compile.backend({self.options.describe()})"


def dataclass_dict(options: Options) -> dict:
    return dict(options.__dict__)


def compile_graph(gm, example_inputs, options: Options, recorder=None, mode=None):
    inductor_config_for_mode(mode)   # (a bad mode is the caller's error: raised before any work)
    name = f"graph{next(_graph_ids)}"
    original: list = []
    # AOT differentiates the graph when grad mode is on and an input (parameters included)
    # requires grad: then its attention sites plan exact attention
    training = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    record = rewrite_graph(gm, options, name, original, training)
    log.info("adaattn: %s: %d site(s) rewritten, %d skipped (%.1f ms)", name, len(record.sites),
             len(record.skipped), record.pass_seconds * 1e3)
    with _recorders_lock:
        targets = list(_recorders) + ([recorder] if recorder is not None else [])
    for target in targets:
        target.append(record)
    building = _start_prebuild(gm, record, name)
    start = time.perf_counter()
    try:
        compiled = inner_compile(gm, example_inputs, options.inner, mode)
    except Exception as exc:
        from torch._dynamo.exc import TorchDynamoException
        if not record.sites or isinstance(exc, TorchDynamoException):
            # the graph as it came: not ours to hide; Dynamo's own signals (restart the
            # analysis, e.g. TensorifyScalarRestartAnalysis under dynamic=True) go to Dynamo
            raise
        # never break a model: the graph as it came, compiled the same way
        record.error = f"compiling the rewritten graph failed: {type(exc).__name__}: {exc}"
        message = (f"adaattn: {name}: {record.error}; its attention runs as written")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        record.sites = []
        gm.graph = original[0]
        gm.recompile()
        record.code_after = gm.code
        compiled = inner_compile(gm, example_inputs, options.inner, mode)
    finally:
        record.inner_seconds = time.perf_counter() - start
        if building is not None:
            # (joined before the first call: it must not build a kernel a second time, nor
            # time an autotune candidate while the model runs; no variant starts from here)
            record.prebuild_wait_seconds = building.wait()
            record.prebuilt = len(building.seconds)
            record.prebuild_seconds = sum(building.seconds.values())
            record.prebuild_errors = list(building.errors.values())
    return compiled


def _start_prebuild(gm: fx.GraphModule, record: GraphRecord, name: str):
    """Start building the kernels of ``record``'s sites on threads (see prebuild.py)."""
    if not record.sites:
        return None
    try:
        jobs = prebuild.jobs_for(gm, {s.id: s.decision for s in record.sites})
        return prebuild.start(name, jobs)
    except Exception as exc:   # (an optimisation only: the first call builds what it needs)
        log.debug("adaattn: %s: no prebuild (%s: %s)", name, type(exc).__name__, exc)
        return None


def adaattn_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None,
                    mode: Optional[str] = None, **kwargs):
    """Entry point registered as ``torch_dynamo_backends: adaattn``. ``options``: ours (see
    options.py); ``mode``: torch.compile's, passed on to Inductor."""
    if kwargs:
        raise TypeError(f"adaattn backend: unexpected argument(s) {sorted(kwargs)}")
    return compile_graph(gm, example_inputs, Options.parse(options), mode=mode)


class record_graphs:
    """Context manager collecting every GraphRecord compiled inside it (any backend instance)."""

    def __enter__(self) -> List[GraphRecord]:
        self.records: List[GraphRecord] = []
        with _recorders_lock:
            _recorders.append(self.records)
        return self.records

    def __exit__(self, *exc):
        with _recorders_lock:
            _recorders.remove(self.records)
        return False
