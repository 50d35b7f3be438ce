"""Build the kernels a graph's attention sites will launch while Inductor compiles the graph.

The first call of each kernel specialisation compiles it (and, for the Triton forward,
compiles and times every autotune candidate): on the H100, t5-small's two specialisations took
6.7-8.5 s of wall time inside its first call, *after* Inductor's own 6-16 s compile
(``scripts/compile_time.py``), which made adaattn's compile time 1.0-1.4x stock's. About 80 % of
a Triton compile runs without the GIL (MLIR, LLVM, ptxas), so the same builds on a thread that
starts as soon as the sites are rewritten overlap Inductor's work almost entirely.

:func:`jobs_for` reads, off the rewritten graph's fake values, one job per distinct forward
call (shapes, strides, dtypes, mask layout, causal, scale, GQA) whose site the planner sends
to our Triton kernels at a single precision (in a graph compiled for training the job runs the
call's backward too, whose autotuned kernels the first backward would build otherwise);
:func:`start` runs them on a few daemon threads with zero-filled inputs of the same shapes and
strides through the very launchers the op calls (:func:`adaattn_compile.op._flash_forward`,
``_flash_backward``), so the specialisations, autotune choices and bound launch they leave are
the ones the first call looks up. A mask the op may prove at run time
(causal, or masking nothing: see :mod:`.mask_proofs`) turns the call into another one, so
those calls are built too, as *variants*, after every call as written (bert-sdpa at L = 4096:
its proven mask's unmasked kernel was built in the first call, 17.4 s of compile against
stock's 9.5). ``compile_graph`` waits for the calls as written before it hands the compiled
graph back (so the first call never builds a kernel twice, and no timing of ours overlaps the
model's run) and starts no variant after the inner compile has finished.

What it leaves alone, so that no first call pays for a guess: dynamic shapes, dropout, sites
on the low-rank or precision-ladder paths (their kernels depend on run-time checks), CPU
sites (nothing to build: the Triton interpreter), jobs whose inputs would take more than
:data:`MAX_JOB_BYTES` or a quarter of the free device memory, and every site when
``ADAATTN_PREBUILD=0``. A job that fails is logged and dropped: the first call then builds
the kernel as before and reports any failure the usual way.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import mask_proofs, planner

log = logging.getLogger("adaattn")

# Inputs of one job (zero-filled, freed right after it). T5-small's encoder site at L = 4096
# needs ~262 MiB (its (1, 8, L, L) bias); a call whose inputs pass this is left to its first
# call, as is one that would take more than a quarter of the free memory (shared by the
# workers).
MAX_JOB_BYTES = 2 << 30

# Jobs built at once. Most of a build runs without the GIL, so two Gluon specialisations
# (bert-sdpa's call as written and its proven-mask variant, ~5.5 s each while Inductor
# compiles) take about as long as one. A job launches its kernel once on zeros, and an
# autotuned one times its candidates: another job's launch may overlap that timing (one
# kernel of a few ms against 5 x ~100 ms of timing).
WORKERS = 4
# The Triton interpreter keeps a launch's grid in process-wide state: two kernels interpreted
# at once fail ("y >= grid_dim[1]"), so there the jobs run one at a time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Devices whose sites get jobs. Not "cpu": there our kernels run under the Triton interpreter,
# which compiles nothing (tests add it to check that a job makes the first call's call).
DEVICE_TYPES: Tuple[str, ...] = ("cuda",)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> "TensorSpec":
        return TensorSpec(tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()),
                          t.dtype)

    @property
    def nbytes(self) -> int:
        if any(s == 0 for s in self.shape):
            return 0
        extent = 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
        return extent * self.dtype.itemsize

    def zeros(self, device) -> torch.Tensor:
        # (filled through a flat buffer: the layout may overlap itself, as a relative bias's
        # view of its table does, and torch refuses in-place writes into such a view)
        extent = self.nbytes // self.dtype.itemsize
        fill = True if self.dtype == torch.bool else 0   # (all masked would be another call)
        flat = torch.full((extent,), fill, dtype=self.dtype, device=device)
        return flat.as_strided(self.shape, self.stride)


@dataclasses.dataclass(frozen=True)
class Job:
    """One forward call to build for: what ``op._flash_forward`` receives."""
    device: str
    q: TensorSpec
    k: TensorSpec
    v: TensorSpec
    mask: Optional[TensorSpec]
    is_causal: bool
    scale: Optional[float]
    enable_gqa: bool
    out_blhd: bool = False      # out in (B, L, H, D) memory (the op's ``out_blhd``)
    # a training graph's call: its backward is built too (grad_out in out's layout), with the
    # mask's gradient where the graph takes one
    backward: bool = False
    mask_needs_grad: bool = False
    sites: Tuple[str, ...] = dataclasses.field(default=(), compare=False, hash=False)
    # a call the sites make only if their mask is proven at run time (mask_proofs.py)
    variant: bool = dataclasses.field(default=False, compare=False, hash=False)

    @property
    def nbytes(self) -> int:
        out = self.q.nbytes // max(1, self.q.shape[-1]) * self.v.shape[-1]
        inputs = sum(s.nbytes for s in (self.q, self.k, self.v, self.mask) if s)
        if self.backward:   # (grad_out and a gradient of each input, the mask's if taken)
            return 2 * (inputs + out) + (self.mask.nbytes if self.mask_needs_grad else 0)
        return inputs + out


def enabled() -> bool:
    return os.environ.get("ADAATTN_PREBUILD", "1") not in ("0", "false", "False", "no", "")


def _fake(node) -> Optional[torch.Tensor]:
    if node is None:
        return None
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*t.shape, *t.stride()))


def jobs_for(gm: fx.GraphModule, decisions: Dict[str, object],
             device_types: Optional[Sequence[str]] = None) -> List[Job]:
    """The distinct forward calls of ``gm``'s rewritten sites worth building ahead of the first
    call. ``decisions``: site id -> its compile-time ``Decision``. No torch side effects."""
    device_types = DEVICE_TYPES if device_types is None else device_types
    jobs: Dict[Job, List[str]] = {}
    proven: Dict[Job, List[str]] = {}   # calls a mask proof may make instead
    target = torch.ops.adaattn.attention.default
    from .op import _training_sites as op_training_sites
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not target:
            continue
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, site = node.args[:9]
        decision = decisions.get(site)
        if (decision is None or decision.kernel != "triton" or decision.rank != "dense"
                or len(decision.precisions) != 1 or dropout_p):
            continue
        fq, fk, fv = _fake(q), _fake(k), _fake(v)
        fmask = _fake(mask)
        if fq is None or fk is None or fv is None or (mask is not None and fmask is None):
            continue
        tensors = [t for t in (fq, fk, fv, fmask) if t is not None]
        if not all(_static(t) for t in tensors) or fq.device.type not in device_types:
            continue
        if any(t.device != fq.device for t in tensors):
            continue
        if not isinstance(scale, (float, int, type(None))):
            continue   # (a scale computed in the graph: a symbolic value)
        training = site in op_training_sites
        job = Job(str(fq.device), TensorSpec.of(fq), TensorSpec.of(fk), TensorSpec.of(fv),
                  TensorSpec.of(fmask) if fmask is not None else None, bool(is_causal),
                  None if scale is None else float(scale), bool(enable_gqa),
                  bool(node.kwargs.get("out_blhd", False)), backward=training,
                  mask_needs_grad=bool(training and fmask is not None
                                       and fmask.is_floating_point() and fmask.requires_grad))
        jobs.setdefault(job, []).append(site)
        if fmask is not None and not is_causal:
            # the call as its mask's run-time proof may turn it (mask_proofs.py): built after
            # every call as written, and only while the inner compile still runs (a variant
            # the sites never make would otherwise cost the compile its build time)
            flops = planner.forward_flops(fq.shape, fk.shape[-2])
            # (a dense site's key mask is checked only where gradients follow: see
            # op._key_mask_worth_proving)
            for keep, causal in mask_proofs.run_time_variants(fmask, fq.shape[-2],
                                                              fk.shape[-2], flops, training):
                variant = dataclasses.replace(job, mask=job.mask if keep else None,
                                              is_causal=causal,
                                              mask_needs_grad=job.mask_needs_grad and keep)
                proven.setdefault(variant, []).append(site)
    built = [dataclasses.replace(job, sites=tuple(sites)) for job, sites in jobs.items()]
    return built + [dataclasses.replace(job, sites=tuple(sites), variant=True)
                    for job, sites in proven.items() if job not in jobs]


def run_job(job: Job) -> float:
    """Build (compile, autotune, bind) ``job``'s kernels with one call on zero inputs; returns
    its wall time in seconds. Raises what the launcher raises."""
    from . import op
    device = torch.device(job.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        q, k, v = job.q.zeros(device), job.k.zeros(device), job.v.zeros(device)
        mask = job.mask.zeros(device) if job.mask is not None else None
        out, lse = op._flash_forward(q, k, v, mask, job.is_causal, job.scale, job.enable_gqa,
                                     out_blhd=job.out_blhd)
        if job.backward:
            # (the backward graph's grad_out: the gradient of a view of out, in its layout)
            op._flash_backward(torch.zeros_like(out), q, k, v, out, lse, mask, job.is_causal,
                               job.scale, job.enable_gqa, job.mask_needs_grad)
    return time.perf_counter() - t0


class Prebuild:
    """The jobs of one graph on up to :data:`WORKERS` threads; :meth:`wait` joins them."""

    def __init__(self, name: str, jobs: List[Job]):
        self.name, self.jobs = name, jobs
        self.seconds: Dict[Job, float] = {}
        self.errors: Dict[Job, str] = {}
        self.skipped: Dict[Job, str] = {}
        self.stop = threading.Event()
        self._todo = iter(jobs)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True,
                                         name=f"adaattn-prebuild-{name}-{i}")
                        for i in range(min(1 if _INTERPRET else WORKERS, len(jobs)))]

    def _next(self) -> Optional[Job]:
        with self._lock:
            return next(self._todo, None)

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if job.variant and self.stop.is_set():
                self.skipped[job] = "a variant, and the inner compile had finished"
                continue
            try:
                device = torch.device(job.device)
                if device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(device)
                    if job.nbytes > min(MAX_JOB_BYTES, free // (4 * len(self.threads))):
                        self.skipped[job] = f"inputs of {job.nbytes >> 20} MiB"
                        continue
                    # (the current stream: the blocks it frees go back to the pool the model
                    # allocates from; the compiling thread enqueues nothing meanwhile)
                    with torch.cuda.device(device):
                        self.seconds[job] = run_job(job)
                        torch.cuda.current_stream(device).synchronize()
                else:
                    self.seconds[job] = run_job(job)
            except Exception as exc:   # the first call builds it and reports the failure
                self.errors[job] = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.debug("adaattn: %s: prebuilding for sites %s failed: %s", self.name,
                          ", ".join(job.sites), self.errors[job])

    def start(self) -> "Prebuild":
        for thread in self.threads:
            thread.start()
        return self

    def wait(self) -> float:
        """Finish the calls as written, start no variant; returns the seconds waited. (A call
        as written is the first call's to build otherwise, at the same cost; a variant may
        never be made.)"""
        t0 = time.perf_counter()
        self.stop.set()
        for thread in self.threads:
            thread.join()
        waited = time.perf_counter() - t0
        log.info("adaattn: %s: %d kernel job(s) prebuilt in %.2f s (waited %.2f s), %d failed, "
                 "%d skipped", self.name, len(self.seconds), sum(self.seconds.values()), waited,
                 len(self.errors), len(self.skipped))
        return waited


def start(name: str, jobs: List[Job]) -> Optional[Prebuild]:
    """Run ``jobs`` on new threads (None where there is nothing to do or it is switched off)."""
    if not jobs or not enabled():
        return None
    return Prebuild(name, jobs).start()
