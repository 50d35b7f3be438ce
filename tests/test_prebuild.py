"""Kernels built on a thread while the inner compiler runs (adaattn_compile/prebuild.py): which
calls get a job, that a job makes exactly the call the first run makes, that failures and the
switch leave the model alone. On CPU the jobs run our kernels under the Triton interpreter
(nothing is compiled there: the GPU test checks that the first call compiles nothing)."""
import dataclasses
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile import op, prebuild
from adaattn_compile.compiler import rewrite_graph
from adaattn_compile.options import Options
from adaattn_compile.report import Report
from helpers import compile_and_run, rel_err, rewritten

TRITON = {"kernel": "triton", "small_call_gflops": 0}


def _three_sites(q, k, v, q2, k2, v2, bias):
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=bias)
    c = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # a's call again
    return a + c, b


def _inputs(dtype=torch.float32, lq=24, lk=40, heads=2, dim=16):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)   # noqa: E731
    return (r(1, heads, lq, dim), r(1, heads, lq, dim), r(1, heads, lq, dim),
            r(2, heads, lq, dim), r(2, heads, lk, dim), r(2, heads, lk, dim),
            r(2, 1, lq, lk))


def _decisions(record, **change):
    return {s.id: dataclasses.replace(s.decision, **change) for s in record.sites}


@pytest.mark.interpreter
def test_one_job_per_distinct_call_with_the_fake_layouts():
    args = _inputs()
    gm, record = rewritten(_three_sites, args, {"policy": "exact", **TRITON})
    assert len(record.sites) == 3
    jobs = prebuild.jobs_for(gm, _decisions(record), device_types=("cpu",))
    assert [len(j.sites) for j in jobs] == [2, 1]
    causal, masked = jobs
    assert causal.is_causal and causal.mask is None and not causal.enable_gqa
    assert causal.q == prebuild.TensorSpec((1, 2, 24, 16), (768, 384, 16, 1), torch.float32)
    assert not masked.is_causal and masked.k.shape == (2, 2, 40, 16)
    assert masked.mask == prebuild.TensorSpec((2, 1, 24, 40), (960, 960, 40, 1), torch.float32)
    assert masked.scale is None
    # the bytes a job allocates: q, k, v, the mask and the output
    assert masked.nbytes == 4 * (2 * 2 * 24 * 16 * 2 + 2 * 2 * 40 * 16 * 2 + 2 * 24 * 40)


@pytest.mark.parametrize("change", [
    {"kernel": "reference"},                 # the planner's exact path: nothing of ours runs
    {"kernel": "sdpa"},                      # a small call left to torch's SDPA
    {"rank": "auto"},                        # the low-rank path decides at run time
    {"precisions": ("fp16", "fp32")},        # the precision ladder decides at run time
])
def test_no_job_where_the_run_time_path_is_not_the_dense_triton_kernel(change):
    args = _inputs()
    gm, record = rewritten(_three_sites, args, {"policy": "exact", **TRITON})
    assert prebuild.jobs_for(gm, _decisions(record, **change), device_types=("cpu",)) == []


def test_no_job_for_cpu_sites_dropout_or_dynamic_shapes():
    args = _inputs()
    gm, record = rewritten(_three_sites, args, {"policy": "exact", **TRITON})
    assert prebuild.jobs_for(gm, _decisions(record)) == []   # (cpu is not a prebuild device)

    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    gm, record = rewritten(dropped, args[:3], {"policy": "exact", **TRITON})
    assert len(record.sites) == 1
    assert prebuild.jobs_for(gm, _decisions(record), device_types=("cpu",)) == []

    captured = {}

    def backend(gm, example_inputs):
        captured["record"] = rewrite_graph(gm, Options.parse({"policy": "exact", **TRITON}), "g")
        captured["gm"] = gm
        return gm.forward
    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                             backend=backend, dynamic=True)
    compiled(*args[:3])
    assert captured["record"].sites and captured["record"].sites[0].dynamic
    assert prebuild.jobs_for(captured["gm"], _decisions(captured["record"]),
                             device_types=("cpu",)) == []


def _signature(q, k, v, mask, causal, scale, gqa):
    spec = lambda t: None if t is None else (tuple(t.shape), t.stride(), t.dtype)  # noqa: E731
    return (spec(q), spec(k), spec(v), spec(mask), bool(causal), scale, bool(gqa))


@pytest.fixture
def spy(monkeypatch):
    """Every ``op._flash_forward`` call: (thread name, the call's signature)."""
    monkeypatch.setattr(prebuild, "DEVICE_TYPES", ("cpu",))
    calls = []
    real = op._flash_forward

    def watched(q, k, v, attn_mask, is_causal, scale, enable_gqa, forward=None,
                out_blhd=False, mask_group=None):
        calls.append((threading.current_thread().name,
                      (*_signature(q, k, v, attn_mask, is_causal, scale, enable_gqa),
                       out_blhd)))
        return real(q, k, v, attn_mask, is_causal, scale, enable_gqa, forward, out_blhd,
                    mask_group)
    monkeypatch.setattr(op, "_flash_forward", watched)
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_job_makes_the_call_the_first_run_makes(spy, dtype):
    args = _inputs(dtype)
    with torch.no_grad():
        ref = _three_sites(*(a.double() for a in args))
        out, sites, _, records = compile_and_run(_three_sites, *args,
                                                 options={"policy": "exact", **TRITON})
    built = [s for name, s in spy if name.startswith("adaattn-prebuild")]
    ran = [s for name, s in spy if not name.startswith("adaattn-prebuild")]
    assert len(built) == 2 and len(ran) == 3
    assert sorted(built, key=repr) == sorted(set(ran), key=repr)
    assert records[0].prebuilt == 2 and not records[0].prebuild_errors
    assert records[0].prebuild_seconds > 0
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel_err(out[0], ref[0]) < tol and rel_err(out[1], ref[1]) < tol
    report = str(Report(records, Options.parse({"policy": "exact", **TRITON})))
    assert "2 kernel call(s) prebuilt alongside it" in report


@pytest.mark.interpreter
def test_gqa_and_bool_mask_jobs_match_the_run(spy):
    def gqa(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 20, 32, generator=g)
    k, v = torch.randn(1, 2, 36, 32, generator=g), torch.randn(1, 2, 36, 32, generator=g)
    keep = torch.rand(1, 1, 20, 36, generator=g) > 0.3
    keep[..., 0] = True
    with torch.no_grad():
        out, sites, _, records = compile_and_run(gqa, q, k, v, keep,
                                                 options={"policy": "exact", **TRITON})
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                             attn_mask=keep, enable_gqa=True)
    built = [s for name, s in spy if name.startswith("adaattn-prebuild")]
    ran = [s for name, s in spy if not name.startswith("adaattn-prebuild")]
    assert built == ran and built[0][3][2] == torch.bool and built[0][6]
    assert rel_err(out, ref) < 1e-5


def _tensor_sig(t):
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_training_graph_builds_the_backward_its_first_call_runs(monkeypatch, with_bias):
    """A graph compiled for training: its job runs the backward too, with the layouts, flags
    and mask gradient the first backward has (grad_out in out's layout)."""
    monkeypatch.setattr(prebuild, "DEVICE_TYPES", ("cpu",))
    calls = []
    real = op._flash_backward

    def watched(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, enable_gqa,
                mask_needs_grad):
        calls.append((threading.current_thread().name, tuple(
            _tensor_sig(t) for t in (grad_out, q, k, v, out, lse, attn_mask))
            + (bool(is_causal), scale, bool(enable_gqa), bool(mask_needs_grad))))
        return real(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, enable_gqa,
                    mask_needs_grad)
    monkeypatch.setattr(op, "_flash_backward", watched)

    def attend(x, bias):   # (B, L, H, D) projections, as a model's heads come
        q, k, v = (x * (i + 1)).transpose(1, 2), x.transpose(1, 2), (x - i).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           is_causal=bias is None)
        return o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    i = 0.5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)
    bias = (torch.randn(1, 2, 24, 24, generator=g, requires_grad=True) if with_bias
            else None)
    out, sites, _, records = compile_and_run(attend, x, bias, options={"policy": "exact",
                                                                       **TRITON})
    out.square().sum().backward()
    built = [c for name, c in calls if name.startswith("adaattn-prebuild")]
    ran = [c for name, c in calls if not name.startswith("adaattn-prebuild")]
    assert len(ran) == 1 and built == ran, (built, ran)
    assert ran[0][-1] == with_bias   # (the bias's gradient taken)
    xr = x.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_() if with_bias else None
    ref = attend(xr, br)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-4
    if with_bias:
        assert rel_err(bias.grad, br.grad) < 1e-4


@pytest.mark.interpreter
def test_a_failed_job_is_recorded_and_the_first_call_builds(monkeypatch):
    monkeypatch.setattr(prebuild, "DEVICE_TYPES", ("cpu",))

    def broken(job):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(prebuild, "run_job", broken)
    args = _inputs()
    with torch.no_grad():
        out, sites, _, records = compile_and_run(_three_sites, *args,
                                                 options={"policy": "exact", **TRITON})
        ref = _three_sites(*(a.double() for a in args))
    assert records[0].prebuilt == 0
    assert records[0].prebuild_errors == ["RuntimeError: no such kernel"] * 2
    assert rel_err(out[1], ref[1]) < 1e-5
    stats = adaattn_compile.stats()
    assert all(stats[s.id]["kernel"] == {"triton": 1} for s in sites)
    assert "2 failed: RuntimeError: no such kernel" in str(
        Report(records, Options.parse({"policy": "exact"})))


def test_switched_off_no_thread(monkeypatch, spy):
    monkeypatch.setenv("ADAATTN_PREBUILD", "0")
    args = _inputs()
    with torch.no_grad():
        _, _, _, records = compile_and_run(_three_sites, *args,
                                           options={"policy": "exact", **TRITON})
    assert records[0].prebuilt == 0 and not records[0].prebuild_errors
    assert all(not name.startswith("adaattn-prebuild") for name, _ in spy)
    assert "prebuilt" not in str(Report(records, Options.parse({"policy": "exact"})))


@pytest.mark.interpreter
def test_the_compile_waits_for_the_thread(monkeypatch):
    """The graph is handed back only once its jobs are done (none still building during the
    first call), and the wait is what the jobs took beyond the inner compile."""
    monkeypatch.setattr(prebuild, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(prebuild, "_INTERPRET", False)   # (no kernel runs: several workers)
    finished = []

    def slow(job):
        time.sleep(0.3)
        finished.append(time.perf_counter())
        return 0.3
    monkeypatch.setattr(prebuild, "run_job", slow)
    args = _inputs()
    compiled = torch.compile(_three_sites, backend=adaattn_compile.backend(
        policy="exact", inner="eager", **TRITON), dynamic=False)
    from adaattn_compile.compiler import record_graphs
    with record_graphs() as records, torch.no_grad():
        t0 = time.perf_counter()
        compiled(*args)
    assert len(finished) == 2 and all(t > t0 for t in finished)
    assert records[0].prebuilt == 2 and abs(records[0].prebuild_seconds - 0.6) < 1e-9
    assert records[0].prebuild_wait_seconds > 0.2   # (the eager "inner compile" takes ~nothing)
    # the two jobs ran side by side (one worker each): the wait is one job's, not two
    assert records[0].prebuild_wait_seconds < 0.55 and abs(finished[0] - finished[1]) < 0.2


def _masked(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.interpreter
@pytest.mark.parametrize("mask_shape, variants", [
    ((1, 1, 32, 32), [(None, True), (None, False)]),   # square: proven causal, or empty
    ((2, 1, 1, 32), []),            # a key mask: not checked at a dense inference site
    ((2, 2, 32, 32), [(None, True), (None, False)]),
    ((1, 1, 32, 1), []),                               # (per-query: not checked at run time)
])
def test_masks_the_op_may_prove_add_variant_jobs_after_the_calls_as_written(
        mask_shape, variants, monkeypatch):
    from adaattn_compile import mask_proofs
    monkeypatch.setattr(mask_proofs, "MIN_LEN", 16)
    monkeypatch.setattr(mask_proofs, "MIN_GFLOPS", 0.0)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 32, 16, generator=g) for _ in range(3))
    mask = torch.randn(*mask_shape, generator=g)
    gm, record = rewritten(_masked, (q, k, v, mask), {"policy": "exact", **TRITON})
    jobs = prebuild.jobs_for(gm, _decisions(record), device_types=("cpu",))
    assert not jobs[0].variant and jobs[0].mask.shape == mask_shape and not jobs[0].is_causal
    assert [(j.mask, j.is_causal) for j in jobs[1:]] == variants
    assert all(j.variant and j.sites == jobs[0].sites for j in jobs[1:])
    monkeypatch.setenv("ADAATTN_RUN_TIME_MASKS", "0")    # no run-time proofs: no variants
    assert len(prebuild.jobs_for(gm, _decisions(record), device_types=("cpu",))) == 1


@pytest.mark.interpreter
def test_a_key_mask_proven_empty_is_a_variant_where_gradients_follow(monkeypatch):
    from adaattn_compile import mask_proofs, op
    monkeypatch.setattr(mask_proofs, "MIN_LEN", 16)
    monkeypatch.setattr(mask_proofs, "MIN_GFLOPS", 0.0)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 32, 16, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 1, 32, generator=g)
    gm, record = rewritten(_masked, (q, k, v, mask), {"policy": "exact", **TRITON})
    monkeypatch.setattr(op, "_training_sites", {s.id for s in record.sites})
    jobs = prebuild.jobs_for(gm, _decisions(record), device_types=("cpu",))
    assert [(j.mask, j.is_causal, j.variant) for j in jobs[1:]] == [(None, False, True)]


@pytest.mark.interpreter
def test_variants_start_only_while_the_inner_compile_runs(monkeypatch):
    """With the (eager) inner compile done at once, the calls as written are still built
    and the variants are not: the first call of a variant builds it, as without a prebuild."""
    from adaattn_compile import mask_proofs
    monkeypatch.setattr(mask_proofs, "MIN_LEN", 16)
    monkeypatch.setattr(mask_proofs, "MIN_GFLOPS", 0.0)
    monkeypatch.setattr(prebuild, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(prebuild, "WORKERS", 1)   # (with more, the variants start at once)
    ran = []

    def slow(job):
        time.sleep(0.2)
        ran.append(job)
        return 0.2
    monkeypatch.setattr(prebuild, "run_job", slow)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        _, _, _, records = compile_and_run(_masked, q, k, v, torch.randn(1, 1, 32, 32),
                                           options={"policy": "exact", **TRITON})
    assert len(ran) == 1 and not ran[0].variant and records[0].prebuilt == 1


def test_a_job_too_large_for_the_device_is_skipped(monkeypatch):
    job = prebuild.Job("cuda:0", *(prebuild.TensorSpec((1, 8, 4096, 64), (2 << 20, 1 << 18, 64, 1),
                                                       torch.bfloat16),) * 3, None, False, None,
                       False, ("s0",))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 << 20, 80 << 30))
    monkeypatch.setattr(prebuild, "run_job", lambda job: pytest.fail("ran"))
    building = prebuild.Prebuild("g", [job]).start()
    building.wait()
    assert building.skipped == {job: "inputs of 16 MiB"} and not building.seconds


def test_tensor_spec_zeros_keeps_strides_and_fills():
    spec = prebuild.TensorSpec((2, 3, 4), (0, 1, 3), torch.float16)   # broadcast + transposed
    t = spec.zeros("cpu")
    assert t.shape == (2, 3, 4) and t.stride() == (0, 1, 3) and not t.any()
    assert spec.nbytes == (1 + 2 * 1 + 3 * 3) * 2
    keep = prebuild.TensorSpec((1, 5), (5, 1), torch.bool).zeros("cpu")
    assert keep.all()
    # a relative bias's view of its per-offset table: rows overlap (unit strides both ways)
    table_view = prebuild.TensorSpec((1, 4, 6, 7), (0, 12, 1, 1), torch.bfloat16).zeros("cpu")
    assert table_view.stride() == (0, 12, 1, 1) and not table_view.any()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt", "t5", "gpt-train"])
def test_gpu_first_call_compiles_none_of_our_kernels(name, monkeypatch):
    """On the GPU every kernel specialisation of the sites is built before the compile hands
    the graph back: every Triton compile of ours (the autotuner's candidate threads included)
    starts before the compile's wait for the prebuild thread ends, none after, in the model's
    first call ("gpt-train": a training step, its backward kernels included). (Inductor's
    kernels load through ``triton.compile``: not counted here.)"""
    from triton.runtime.jit import JITFunction
    from adaattn_compile.kernels import clear_compiled
    clear_compiled()
    compiles, waits = [], []
    real_compile, real_wait = JITFunction._do_compile, prebuild.Prebuild.wait

    def counted(self, *args, **kwargs):
        compiles.append((time.perf_counter(), threading.current_thread().name, self.__name__))
        return real_compile(self, *args, **kwargs)

    def timed_wait(self):
        waited = real_wait(self)
        waits.append(time.perf_counter())
        return waited
    monkeypatch.setattr(JITFunction, "_do_compile", counted)
    monkeypatch.setattr(prebuild.Prebuild, "wait", timed_wait)
    torch.manual_seed(0)
    if name.startswith("gpt"):
        from adaattn_compile.models import TinyGPT
        model = TinyGPT(layers=2, dim=256, heads=4, max_len=2048).cuda().bfloat16().eval()
        args, kwargs = (torch.randint(0, 256, (1, 2048), device="cuda"),), {}
    else:   # t5-small's shapes, 2 + 2 layers: a biased encoder site and a cross-attention site
        from adaattn_compile.bench import _place, build_model
        built = build_model("t5-eager", 2048, dtype=torch.bfloat16, device="cuda", layers=2)
        model = built.model.eval()
        args, kwargs = _place(built.make_inputs(), "cuda", torch.bfloat16)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    with torch.set_grad_enabled(name == "gpt-train"):
        out, sites, _, records = compile_and_run(model, *args, options={"inner": "inductor"},
                                                 **kwargs)
        if name == "gpt-train":
            out.float().square().mean().backward()
            assert all(p.grad is not None for p in model.parameters())
            out = out.detach()
    from adaattn_compile.bench import main_tensor
    ref, out = main_tensor(ref), main_tensor(out)
    ours = [s for s in sites if s.decision.kernel == "triton"]
    assert ours and sum(r.prebuilt for r in records) >= 1
    assert not [r.prebuild_errors for r in records if r.prebuild_errors]
    assert compiles and waits
    late = [c for c in compiles if c[0] > max(waits)]
    assert late == [], (late, compiles, waits)
    assert rel_err(out, ref) < 2e-2


# --- small forward calls are not autotuned (their candidates' compiles were most of the
# first-call time): the candidate that fills the GPU is taken instead

def _cfgs(*blocks_m):
    import triton
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}) for m in blocks_m]


@pytest.mark.parametrize("lq, rows, want", [
    (4096, 8, 0),       # 32 x 8 = 256 programs with 128-row blocks: the first candidate
    (512, 8, 2),        # 4 x 8 = 32 < 132 SMs; 64-row blocks 64, 32-row blocks 128: the most
    (512, 33, 0),       # 4 x 33 = 132 fills them already
    (512, 17, 1),       # 4 x 17 = 68; 64-row blocks: 136, the first that fills them
])
def test_small_calls_take_the_grid_filling_candidate(lq, rows, want, monkeypatch):
    from adaattn_compile.kernels import flash
    monkeypatch.setattr(flash, "_sm_count", lambda index: 132)
    cfgs = _cfgs(128, 64, 32)
    assert flash._grid_filling_config(cfgs, (lq, rows), torch.device("cuda", 0)) == want


def test_only_calls_below_the_bar_skip_autotuning():
    from adaattn_compile.kernels import flash
    q = torch.empty(1, 8, 512, 64, device="meta")
    k = torch.empty(1, 8, 4096, 64, device="meta")
    assert flash._small_call(q, k, False) == (512, 8)           # 4.3 GFLOP
    big = torch.empty(1, 8, 4096, 64, device="meta")
    assert flash._small_call(big, k, False) is None             # 34 GFLOP
    assert flash._small_call(big, k, True) is None              # 17 GFLOP causal
    assert flash._fwd_flops(big, k, True) * 2 == flash._fwd_flops(big, k, False)


def test_one_worker_under_the_interpreter(monkeypatch):
    """Two kernels interpreted at once corrupt each other's grid (the interpreter's state is
    process-wide): there the jobs run one at a time; compiled, on up to WORKERS threads."""
    spec = prebuild.TensorSpec((1, 1, 8, 16), (128, 128, 16, 1), torch.float32)
    jobs = [prebuild.Job("cpu", spec, spec, spec, None, causal, None, False)
            for causal in (False, True)]
    monkeypatch.setattr(prebuild, "_INTERPRET", True)
    assert len(prebuild.Prebuild("g", jobs).threads) == 1
    monkeypatch.setattr(prebuild, "_INTERPRET", False)
    assert len(prebuild.Prebuild("g", jobs).threads) == 2


def test_an_autotuner_runs_one_call_at_a_time(monkeypatch):
    """Kernel builds run on threads: an autotuner keeps a call's arguments on itself while it
    tunes (the descriptor kernels' pre-hooks read them), so its calls are serialised."""
    from adaattn_compile.kernels import flash
    fn = flash._tuned("fwd", 64, torch.float32, torch.device("cpu"))
    assert isinstance(fn, flash._ParallelCompileAutotuner)
    inside, most = [0], [0]
    lock = threading.Lock()

    def slow_run(self, *args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        with lock:
            inside[0] -= 1
    monkeypatch.setattr(flash._Autotuner, "run", slow_run)
    threads = [threading.Thread(target=fn.run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
