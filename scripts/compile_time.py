"""Where a model's compile time goes: stock torch.compile against adaattn, phase by phase.

    python3 scripts/compile_time.py --model t5-eager --seq 4096 [--rounds 2] [--profile FILE]

Compiles the benchmark registry's model (bf16, batch 1, inference) with each compiler, each
with a cold Inductor/Triton cache and (adaattn) our kernels forgotten, as ``adaattn bench
--cache fresh`` does, and prints per compile: the first call's wall time less one steady call
(the bench's "compile s"), Dynamo's phase times, and for adaattn the time of our graph passes,
of the inner (Inductor) compile, and of the Triton compiles run in this process (ours:
Inductor's own kernels build in its worker processes) with their count and how many
overlapped. Written for issue 6's "compile time <= 1.25x stock" (t5-eager was 1.38x).
"""
import argparse
import cProfile
import contextlib
import json
import pstats
import statistics
import threading
import time

import torch

import adaattn_compile
from adaattn_compile.bench import _cache_context, _Case, Config, Settings, build_model
from adaattn_compile.compiler import record_graphs


class TritonCompileClock:
    """Wall time of every in-process Triton compile (``JITFunction._do_compile``; autotune
    candidates compiled in threads included), their count and the union of their intervals."""

    def __init__(self):
        self.spans, self.lock, self.saved = [], threading.Lock(), None

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        self.saved = getattr(JITFunction, "_do_compile", None)
        if self.saved is None:
            return self
        saved, clock = self.saved, self

        def timed(fn_self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return saved(fn_self, *args, **kwargs)
            finally:
                with clock.lock:
                    clock.spans.append((t0, time.perf_counter(),
                                        getattr(fn_self, "__name__", "?"),
                                        threading.current_thread().name))
        JITFunction._do_compile = timed
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            from triton.runtime.jit import JITFunction
            JITFunction._do_compile = self.saved

    def summary(self):
        spans = sorted(self.spans)
        union, end = 0.0, None
        for a, b, *_ in spans:
            if end is None or a > end:
                union += b - a
                end = b
            elif b > end:
                union += b - end
                end = b
        names, threads = {}, {}
        for a, b, n, t in spans:
            names[n] = names.get(n, 0.0) + (b - a)
            t = t.split("_")[0]   # (a pool's workers as one)
            threads[t] = threads.get(t, 0) + 1
        return {"count": len(spans), "sum_s": round(sum(b - a for a, b, *_ in spans), 3),
                "threads": threads,
                "wall_s": round(union, 3),
                "by_kernel_s": {k: round(v, 3) for k, v in sorted(names.items(), key=lambda x: -x[1])}}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compile_once(case, compiler, policy, profile_path=None):
    torch._dynamo.reset()
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", None)
    if metrics is not None:
        metrics.clear()   # (Dynamo's phase times add up over compiles otherwise)
    if compiler == "stock":
        fn = torch.compile(case.model, dynamic=False)
    else:
        fn = torch.compile(case.model, backend=adaattn_compile.backend(policy=policy),
                           dynamic=False)
    step = case.step_fn(fn)
    recorder = record_graphs() if compiler == "adaattn" else contextlib.nullcontext([])
    profiler = cProfile.Profile() if profile_path else None
    with _cache_context("fresh", compiler == "adaattn"), recorder as records, \
            TritonCompileClock() as clock:
        sync()
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        step()
        sync()
        if profiler:
            profiler.disable()
        first = time.perf_counter() - t0
    for _ in range(3):
        step()
    sync()
    steady = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        sync()
        steady.append(time.perf_counter() - t)
    row = {"compiler": compiler, "first_call_s": round(first, 3),
           "compile_s": round(first - statistics.median(steady), 3),
           "triton_in_process": clock.summary()}
    if records:
        row["pass_s"] = round(sum(r.pass_seconds for r in records), 3)
        row["inner_s"] = round(sum(r.inner_seconds for r in records), 3)
        row["graphs"] = len(records)
        row["prebuilt"] = sum(r.prebuilt for r in records)
        row["prebuild_s"] = round(sum(r.prebuild_seconds for r in records), 3)
        row["prebuild_wait_s"] = round(sum(r.prebuild_wait_seconds for r in records), 3)
        row["prebuild_errors"] = [e for r in records for e in r.prebuild_errors]
        row["sites"] = sum(len(r.sites) for r in records)
        row["decisions"] = sorted({f"{s.decision.kernel}/{s.decision.precision}"
                                   for r in records for s in r.sites})
    try:
        row["dynamo_phases"] = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
    except Exception as exc:   # (its signature moved between torch versions)
        row["dynamo_phases"] = f"unavailable: {exc}"
    if profiler:
        with open(profile_path, "a") as f:
            f.write(f"==== {compiler} first call ====\n")
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="t5-eager")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--policy", default="exact")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--order", default="stock,adaattn")
    ap.add_argument("--profile", default=None, help="cProfile of each first call into FILE")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", default="real", help="real, or tiny (a CPU smoke run)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    built = build_model(args.model, args.seq, 1, dtype=dtype, device=args.device,
                        scale=args.scale)
    case = _Case(built, Config(args.model, args.seq, 1, "infer"),
                 Settings(device=args.device, dtype="bf16" if args.device == "cuda" else "fp32"))
    case.prepare(dtype)
    rows = []
    for rnd in range(args.rounds):
        for compiler in args.order.split(","):
            row = compile_once(case, compiler, args.policy,
                               args.profile if rnd == args.rounds - 1 else None)
            row["round"] = rnd
            rows.append(row)
            printable = {k: v for k, v in row.items() if k != "dynamo_phases"}
            print(json.dumps(printable), flush=True)
            print(row["dynamo_phases"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "seq": args.seq, "device":
                       torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
