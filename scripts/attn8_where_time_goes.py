"""Where the 8-bit forward's time goes on an H100 (issue 4): the pre-pass against an earlier
version of it, and the Gluon kernel with parts of its loop taken out.

    python3 scripts/attn8_where_time_goes.py --json out.json [--prepass-baseline OLD_ATTN8_PY]
        [--kernel-baseline OLD_ATTN8_HOPPER_PY]

* Pre-pass: ``attn8.quantise(..., sm90=True)`` on bf16, 16k tokens x 2048 channels, at 4 and 8
  warps a program (``ADAATTN_ATTN8_PREPASS_WARPS``); with ``--prepass-baseline`` (a copy of
  an earlier ``kernels/attn8.py``, e.g. ``git show ed72f32:adaattn_compile/kernels/attn8.py``)
  that version too, interleaved in the same process, and how far the two forms' codes and
  scales differ.
* With ``--kernel-baseline`` (a copy of an earlier ``kernels/attn8_hopper.py``): that kernel
  against the current one on the same pre-pass output, D = 128 / 64, causal or not, L = 4k /
  16k, three rounds interleaved, and the largest difference between their outputs.
* Kernel ablations: a copy of ``kernels/attn8_hopper.py`` is built with one part of the loop
  taken out, each in a process of its own, and timed on the same pre-pass output (D = 128,
  non-causal, L = 4k and 16k): ``as-is``; ``no-softmax`` (P is the scores' low byte: no
  ``exp2``, no rounding); ``no-fold`` (each tile's INT32 P·V is not folded into O);
  ``exp2-to-max`` (``exp2`` replaced by a max, so the special-function pipe is idle);
  ``no-turns`` (the two consumer warpgroups do not take turns issuing). The outputs of the
  ablated kernels are wrong by design; only their times are read. At L = 4k each also runs
  for 3 s on end while ``nvidia-smi`` samples the SM clock, the power and the throttle
  reasons every 50 ms (is a variant faster or slower only because the clock moved?).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from adaattn_compile.kernels import attn8  # noqa: E402

# (name, [(text in attn8_hopper.py, its replacement)])
ABLATIONS = [
    ("as-is", []),
    ("no-softmax", [("        w = (p * 127.0 + 12582912.0).to(gl.int32, bitcast=True)\n",
                     "        w = s\n")]),
    ("no-fold", [("WG, STAGES)\n        acc = _fold_pv(acc, pv_pend, w_pend, a_pend, o_layout)\n",
                  "WG, STAGES)\n")]),
    ("exp2-to-max", [("        p = gl.exp2(f * gl.expand_dims(c, 1) - gl.expand_dims(m_arg, 1))",
                      "        p = gl.maximum(f * gl.expand_dims(c, 1) - gl.expand_dims(m_arg, 1),"
                      " 0.0)")]),
    ("no-turns", [("        mbarrier.wait(turn.index(WG), j & 1)\n", "")]),
]


def _module_from(path, name):
    """Load ``path`` as ``adaattn_compile.kernels.<name>`` (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"adaattn_compile.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def prepass(baseline):
    from triton.testing import do_bench
    versions = [("current", attn8)]
    if baseline:
        versions.append(("baseline", _module_from(baseline, "_attn8_baseline")))
    rows = []
    for D in (128, 64):
        for L in (4096, 16384):
            B, H = 16384 // L, 2048 // D
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            row = {"D": D, "L": L}
            for _ in range(2):   # two rounds, versions interleaved
                for name, mod in versions:
                    for warps in ("4", "8"):
                        os.environ["ADAATTN_ATTN8_PREPASS_WARPS"] = warps
                        mod.clear_compiled()
                        ms = do_bench(lambda: mod.quantise(q, k, v, sm90=True),
                                      return_mode="median")
                        row.setdefault(f"{name}_ms_w{warps}", []).append(round(ms, 4))
            os.environ.pop("ADAATTN_ATTN8_PREPASS_WARPS")
            if baseline:
                a = versions[1][1].quantise(q, k, v, sm90=True)
                b = attn8.quantise(q, k, v, sm90=True)
                for key in ("q8", "k8", "v8t"):
                    row[f"{key}_largest_code_difference"] = \
                        (a[key].int() - b[key].int()).abs().max().item()
                for key in ("qs", "ks", "vs", "qm"):
                    row[f"{key}_relative_difference"] = \
                        ((a[key] - b[key]).norm() / a[key].norm()).item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sustained(fn, seconds=3.0):
    """Run ``fn`` for ``seconds`` on end; -> (ms a call, mean SM clock MHz, lowest SM clock,
    mean power W, the throttle-reason masks seen), nvidia-smi sampling every 50 ms."""
    samples = []

    def sample():
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active",
             "--format=csv,noheader,nounits", "-lms", "50"], stdout=subprocess.PIPE, text=True)
        time.sleep(seconds)
        smi.terminate()
        samples.extend(smi.stdout.read().splitlines())
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    sampler = threading.Thread(target=sample)
    sampler.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, calls = time.time(), 0
    start.record()
    while time.time() - t0 < seconds + 0.2:
        for _ in range(50):
            fn()
        calls += 50
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    sampler.join()
    # (the first and last samples straddle the loop's start and end)
    rows = [x.split(", ") for x in samples[5:-2] if x.count(",") == 2]
    clocks, power = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    return (start.elapsed_time(end) / calls, sum(clocks) / max(len(clocks), 1),
            min(clocks, default=0.0), sum(power) / max(len(power), 1),
            sorted({r[2] for r in rows}))


def kernel_ab(baseline):
    from triton.testing import do_bench
    from adaattn_compile.kernels import attn8_hopper
    versions = (("baseline", _module_from(baseline, "_attn8_hopper_baseline")),
                ("current", attn8_hopper))
    rows = []
    for D in (128, 64):
        for causal in (False, True):
            for L in (4096, 16384):
                B, H = 16384 // L, 2048 // D
                q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                t = attn8.quantise(q, k, v, sm90=True)
                flops = 4 * B * H * L * L * D / (2 if causal else 1)
                row, outs = {"D": D, "causal": causal, "L": L}, {}
                for _ in range(3):
                    for name, mod in versions:
                        o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="cuda")
                        ms = do_bench(lambda: mod.attend(t, q, causal, L, o, lse),
                                      return_mode="median")
                        row.setdefault(f"{name}_tflops", []).append(round(flops / ms / 1e9, 1))
                        outs[name] = o
                row["largest_output_difference"] = \
                    (outs["baseline"].float() - outs["current"].float()).abs().max().item()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def ablation_child(name):
    """(in a process of its own) time the kernel built with ablation ``name``."""
    from triton.testing import do_bench
    src = open(os.path.join(ROOT, "adaattn_compile", "kernels", "attn8_hopper.py")).read()
    for old, new in dict(ABLATIONS)[name]:
        if src.count(old) != 1:
            raise SystemExit(f"ablation {name}: its text is not once in attn8_hopper.py")
        src = src.replace(old, new)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "attn8_hopper_ablated.py")
        with open(path, "w") as f:
            f.write(src)
        mod = _module_from(path, "attn8_hopper_ablated")
        row = {"ablation": name}
        for L in (4096, 16384):
            D = 128
            B, H = 16384 // L, 2048 // D
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            t = attn8.quantise(q, k, v, sm90=True)
            o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="cuda")
            ms = do_bench(lambda: mod.attend(t, q, False, L, o, lse), return_mode="median")
            row[f"ms_{L}"] = round(ms, 4)
            row[f"tflops_{L}"] = round(4 * B * H * L * L * D / ms / 1e9, 1)
            if L == 4096:
                ms, clock, lowest, watts, reasons = sustained(
                    lambda: mod.attend(t, q, False, L, o, lse))
                row.update(sustained_ms_4096=round(ms, 4), sm_clock_mhz=round(clock),
                           sm_clock_lowest_mhz=lowest, power_w=round(watts),
                           throttle_reasons=reasons)
    print("ROW " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--prepass-baseline", default="")
    ap.add_argument("--kernel-baseline", default="")
    ap.add_argument("--ablation-child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ablation_child:
        return ablation_child(a.ablation_child)
    result = {"device": torch.cuda.get_device_name(), "prepass": prepass(a.prepass_baseline),
              "kernel_ab": kernel_ab(a.kernel_baseline) if a.kernel_baseline else [],
              "ablations": []}
    # as-is first and last: the machine's drift between them bounds what a difference means
    for name in [n for n, _ in ABLATIONS] + ["as-is"]:
        run = subprocess.run([sys.executable, __file__, "--ablation-child", name],
                             capture_output=True, text=True, timeout=300)
        rows = [json.loads(line[4:]) for line in run.stdout.splitlines()
                if line.startswith("ROW ")]
        row = rows[0] if rows else {"ablation": name, "error": run.stderr[-800:]}
        result["ablations"].append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
