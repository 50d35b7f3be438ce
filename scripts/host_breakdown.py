"""Where a compiled model's host time goes, our op's share of it measured in place.

    python3 scripts/host_breakdown.py --model bert-sdpa --seq 4096 [--calls 10] [--rounds 5]

For the benchmark registry's model (bf16, batch 1, inference) compiled by stock torch.compile
and by adaattn, prints the host time of one forward (from the call until it returns, kernels
still queued; the device idle at the start, as the bench's per-call timer has it) and the
call's time, in rounds that take turns (the host's speed drifts within a run). For adaattn also:
  * the op's body and the functions under it, timed in place (perf_counter around each, summed
    per forward): what our Python costs a forward, without a profiler's overhead;
  * the same forward with the op's body replaced by one that returns the outputs of an
    earlier call (no kernel, no Python of ours): the rest is the graph's own host time plus
    the dispatcher's, so ``host - host(stub)`` is what the body costs; by one that allocates
    fresh outputs and does nothing else ("outputs only"); and the body as it is but for the
    kernel launch through ``launch.CLaunch`` ("no launch": what the launch itself costs);
  * the same forward with Inductor's code calling the operator through the dispatcher
    (``op._DIRECT_CALL`` off), not our entry points (``inductor_call.py``);
  * the same forward with the op's lanes off (``op._LANES_ON``: every call takes the full path);
  * the same forward with bound launches through triton's Python launcher instead of its C
    launch (``launch._C_LAUNCH``, see ``launch.CLaunch``).
A host-probe (a fixed pure-Python loop) is printed with each model: the H100 machine's host
speed moves by 2x between runs.

``--fine``: stock and adaattn only, forwards alternating one by one (``--calls * --rounds``
each): the spread of their host times, the op's steps and their callees timed in place (the
bias tile, the descriptors, the C launch), and the garbage collections and cudaMalloc calls
that fell within them.
"""
import argparse
import collections
import functools
import gc
import statistics
import sys
import time

import torch

import adaattn_compile
from adaattn_compile import op as op_module
from adaattn_compile.bench import host_probe, main_tensor, model_and_inputs
from adaattn_compile.kernels import flash, flash_hopper, launch

stats_module = sys.modules["adaattn_compile.stats"]   # (the package's `stats` is a function)

_spent = collections.defaultdict(float)
_count = collections.defaultdict(int)


def _timed(module, name, label=None):
    fn = getattr(module, name)
    label = label or f"{module.__name__.rsplit('.', 1)[-1]}.{name}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[label] += time.perf_counter() - t0
            _count[label] += 1
    setattr(module, name, wrapper)
    return fn


def per_call(step, calls):
    """(median host ms, median call ms): each call starts on an idle device."""
    host, wall = [], []
    for _ in range(3):
        step()
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(host), statistics.median(wall)


def _gc_timer():
    """gc.callbacks entry timing each collection: -> (callback, {generation: [count, s]})."""
    spent = collections.defaultdict(lambda: [0, 0.0])
    started = [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            entry = spent[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - started[0]
    return callback, spent


def fine(stock, ours, forwards):
    """Stock and adaattn forwards alternating, each started on an idle device: the spread of
    their host times, what our steps cost in place (their callees timed one level down), and
    what else ran during them (collections, cudaMalloc calls)."""
    timed = []
    for module, name in ((op_module, "inductor_attention_out_only"), (op_module, "_direct_ok"),
                         (op_module, "attention_impl"), (op_module, "_lane_call"),
                         (flash, "_fwd_signature"), (flash, "run_fast"),
                         (flash, "_EMPTY_STRIDED_CUDA"), (flash_hopper.BoundForward, "__call__"),
                         (flash_hopper, "_shared_bias_tile"), (flash_hopper, "_bias_tile"),
                         (launch.CLaunch, "descriptor"), (launch.CLaunch, "__call__"),
                         (launch, "hooks"), (stats_module, "record_call")):
        if getattr(module, name, None) is not None:
            timed.append((module, name, _timed(module, name,
                                               f"{getattr(module, '__name__', '?')}.{name}")))
    host = {"stock": [], "adaattn": [], "adaattn, timers on": []}
    gc_spent = {name: None for name in host}
    mallocs = {name: 0 for name in host}
    callbacks = {}
    for name in host:
        callbacks[name] = _gc_timer()

    def one(name, step):
        callback, _ = callbacks[name]
        gc.callbacks.append(callback)
        before = torch.cuda.memory_stats().get("num_device_alloc", 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        mallocs[name] += torch.cuda.memory_stats().get("num_device_alloc", 0) - before
        gc.callbacks.remove(callback)
        host[name].append((t1 - t0) * 1e3)

    real = {module_name: (module, name, fn) for module_name, (module, name, fn) in
            ((f"{m.__name__}.{n}", (m, n, f)) for m, n, f in timed)}
    wrapped = {key: getattr(module, name) for key, (module, name, _) in real.items()}

    def set_timers(on):
        for key, (module, name, fn) in real.items():
            setattr(module, name, wrapped[key] if on else fn)
    set_timers(False)
    for _ in range(3):
        stock(), ours()
    _spent.clear()
    _count.clear()
    for i in range(forwards):
        one("stock", stock)
        one("adaattn", ours)
        set_timers(True)
        one("adaattn, timers on", ours)
        set_timers(False)
    for name, times in host.items():
        times = sorted(times)
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
        _, spent = callbacks[name]
        collections_ = ", ".join(f"gen{g} {c} ({s * 1e3:.2f} ms)" for g, (c, s) in sorted(spent.items()))
        print(f"  {name:20s} host ms over {len(times)} forwards: min {times[0]:.3f}, p25 "
              f"{q(0.25):.3f}, median {q(0.5):.3f}, p75 {q(0.75):.3f}, max {times[-1]:.3f}; "
              f"collections: {collections_ or 'none'}; cudaMalloc calls {mallocs[name]}",
              flush=True)
    print(f"  timed in place (mean per forward over {forwards}):", flush=True)
    for label in sorted(_spent, key=lambda x: -_spent[x]):
        print(f"    {label:45s} {_spent[label] / forwards * 1e3:7.3f} ms "
              f"({_count[label] / forwards:.0f} calls, "
              f"{_spent[label] / max(_count[label], 1) * 1e6:6.1f} us each)", flush=True)
    print(f"  host probe now {host_probe()[0]:.1f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="bert-sdpa")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fine", action="store_true",
                    help="only stock against adaattn, many alternating forwards: each one's "
                         "host time, the op's steps timed in place, garbage collections and "
                         "device allocations during them")
    args = ap.parse_args()
    model, a, kw = model_and_inputs(args.model, args.seq)

    def stepper(fn):
        def step():
            with torch.no_grad():
                return main_tensor(fn(*a, **kw))
        return step

    print(f"== {args.model} L={args.seq}: host probe {host_probe()[0]:.1f} ms", flush=True)
    torch._dynamo.reset()
    stock = stepper(torch.compile(model, dynamic=False))
    stock()
    torch._dynamo.reset()
    ours = stepper(torch.compile(model, dynamic=False,
                                 backend=adaattn_compile.backend(policy="exact")))
    ours()
    calls_before = sum(s["calls"] for s in adaattn_compile.stats().values())
    ours()
    sites = sum(s["calls"] for s in adaattn_compile.stats().values()) - calls_before
    print(f"  op calls a forward: {sites}", flush=True)
    if args.fine:
        fine(stock, ours, args.calls * args.rounds)
        return

    # the body stubbed: each call returns the outputs of the real call with the same shapes
    saved = {}
    real = op_module.attention_impl

    def stub(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy, kernel,
             out_blhd=False, out_only=False):
        key = (site, q.shape, k.shape)
        got = saved.get(key)
        if got is None:
            got = saved[key] = real(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                    site, policy, kernel, out_blhd)
        return got

    def stubbed():
        op_module.attention_impl = stub
        try:
            return ours()
        finally:
            op_module.attention_impl = real
    stubbed()

    def fresh_outputs(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy,
                      kernel, out_blhd=False, out_only=False):
        out, lse, seed = stub(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site,
                              policy, kernel, out_blhd)
        return (torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device),
                torch.empty(lse.shape, dtype=lse.dtype, device=lse.device),
                op_module._NO_SEED.new_zeros(1))

    def outputs_only():
        op_module.attention_impl = fresh_outputs
        try:
            return ours()
        finally:
            op_module.attention_impl = real
    outputs_only()

    c_launch_call = launch.CLaunch.__call__

    def no_launch():   # the body as it runs, but for the kernel launch (outputs left unwritten)
        launch.CLaunch.__call__ = lambda self, grid, stream, args: None
        try:
            return ours()
        finally:
            launch.CLaunch.__call__ = c_launch_call
    no_launch()

    def lanes_off():
        op_module._LANES_ON = False
        try:
            return ours()
        finally:
            op_module._LANES_ON = True
    lanes_off()

    def dispatcher():   # Inductor's code calls our entry points; here they take the operator
        op_module._DIRECT_CALL = False
        try:
            return ours()
        finally:
            op_module._DIRECT_CALL = True
    dispatcher()

    def c_launch_off():
        launch._C_LAUNCH = False
        try:
            return ours()
        finally:
            launch._C_LAUNCH = True
    c_launch_off()

    # rounds of --calls calls of each, in turn: the host's speed drifts within a run
    variants = {"stock": stock, "adaattn": ours, "adaattn, dispatcher": dispatcher,
                "adaattn, lanes off": lanes_off,
                "adaattn, C launch off": c_launch_off, "adaattn, no launch": no_launch,
                "adaattn, outputs only": outputs_only, "adaattn, body stubbed": stubbed}
    host = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            h, w = per_call(step, args.calls)
            host[name].append(h)
            wall[name].append(w)
    for name in variants:
        print(f"  {name:22s} host {statistics.median(host[name]):.3f} ms, call "
              f"{statistics.median(wall[name]):.3f} ms (median of {args.rounds} rounds' "
              f"medians; host by round: {', '.join(f'{x:.2f}' for x in host[name])})",
              flush=True)

    # the body and what it calls, timed in place
    originals = [(op_module, "attention_impl", _timed(op_module, "attention_impl"))]
    for module, name in ((op_module, "_drop_proven_mask"), (op_module, "_plan"),
                         (op_module, "_lane_call"), (op_module, "_flash_forward"),
                         (flash, "flash_forward"), (flash, "run_fast"),
                         (flash, "_fwd_signature"), (launch, "run_compiled"),
                         (stats_module, "record_call")):
        originals.append((module, name, _timed(module, name)))
    _spent.clear()
    _count.clear()
    host_timed, _ = per_call(ours, args.calls)
    forwards = args.calls + 3
    print(f"  adaattn, timers on: host {host_timed:.3f} ms; per forward:", flush=True)
    for label in sorted(_spent, key=lambda x: -_spent[x]):
        print(f"    {label:28s} {_spent[label] / forwards * 1e3:7.3f} ms "
              f"({_count[label] // forwards} calls, "
              f"{_spent[label] / max(_count[label], 1) * 1e6:6.1f} us each)", flush=True)
    for module, name, fn in originals:
        setattr(module, name, fn)
    print(f"  host probe now {host_probe()[0]:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
