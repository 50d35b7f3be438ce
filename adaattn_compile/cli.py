"""``adaattn``: explain what the backend rewrites, benchmark it, and run the demo."""
from __future__ import annotations

import argparse
import importlib
import sys


def _load_factory(spec: str):
    if ":" not in spec:
        raise SystemExit(f"adaattn explain: expected pkg.module:factory, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise SystemExit(f"adaattn explain: {module_name} has no attribute {attr!r}")
    made = factory() if callable(factory) else factory
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise SystemExit("adaattn explain: the factory must return (model, args) or "
                         "(model, args, kwargs)")
    model, args = made[0], tuple(made[1])
    kwargs = dict(made[2]) if len(made) == 3 else {}
    return model, args, kwargs


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``adaattn bench`` flags (values are checked in ``adaattn_compile.bench``, which names
    the argument in each error). Defaults left as None are filled there by device/preset."""
    p.add_argument("--models", help="comma list of model names and groups (all, default, hf, "
                   "eager, sdpa); default: default. --list shows them")
    p.add_argument("--seq", help="comma list of sequence lengths (4096 or 4k); default 4096 on "
                   "cuda, 256 on cpu")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (default 1)")
    p.add_argument("--policy", default="exact", help="comma list of exact,balanced,fast "
                   "(default exact); adaattn compiles once per policy")
    p.add_argument("--mode", help="infer, train (forward + loss + backward) or both; "
                   "default infer")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--repeat", type=int, default=10, help="timed calls; the median is kept")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="compile every compiler of a model first, then time them in ROUNDS "
                   "alternating rounds (--repeat calls in all), so that they share the host's "
                   "speed of the moment; 0 (default): time each right after its compile")
    p.add_argument("--compilers", default="eager,stock,adaattn",
                   help="comma list of eager,stock,adaattn (default all three)")
    p.add_argument("--no-compile-stock", action="store_true", help="leave stock torch.compile out")
    p.add_argument("--stock-backend", default="inductor",
                   choices=["inductor", "aot_eager", "eager"],
                   help="backend of the 'stock' compiler (default inductor)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="adaattn's inner compiler for the rest of the graph (default inductor)")
    p.add_argument("--scale", default="real", choices=["real", "tiny"],
                   help="model sizes: real (the issue's) or tiny (tests, smoke runs)")
    p.add_argument("--layers", type=int, help="override every config model's layer count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="fresh", choices=["fresh", "shared"],
                   help="fresh: a cold Inductor/Triton cache for each compile, so compile times "
                   "compare (default); shared: the process's cache")
    p.add_argument("--max-minutes", type=float, help="start a model only if it should end "
                   "inside this many minutes (by the mean time of those run so far); the rest "
                   "are recorded as skipped")
    p.add_argument("--preset", help="a named run (issue6: the H100 target table, training "
                   "step and length sweep; smoke); replaces --models/--seq/--mode")
    p.add_argument("--out", help="directory for results.json, results.csv, results.md, *.png")
    p.add_argument("--append", action="store_true", help="add to --out's results.json; configs "
                   "measured there already are not run again (completes a cut-short run)")
    p.add_argument("--from-json", metavar="FILE", help="no run: table, CSV and plots again from "
                   "a results.json (into --out or the file's directory)")
    p.add_argument("--list", action="store_true", help="list models, groups and presets")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench_argv(argv):
    args = list(sys.argv[1:] if argv is None else argv)
    return args[args.index("bench") + 1:] if "bench" in args else args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="adaattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    explain = sub.add_parser("explain", help="report every attention site of a model")
    explain.add_argument("factory", help="pkg.module:factory returning (model, args[, kwargs])")
    explain.add_argument("--policy", default="balanced")
    explain.add_argument("--inner", default="eager", help="compiler for the rest (default eager: "
                         "the report needs only the rewrite)")
    explain.add_argument("--no-graphs", action="store_true", help="omit the graphs' code")

    demo = sub.add_parser("demo", help="all-MiniLM-L6-v2 compiled with adaattn")
    demo.add_argument("--policy", default="exact")
    demo.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                      help="HF attention implementation (eager: hand-written attention)")
    demo.add_argument("--repeat", type=int, default=10)
    demo.add_argument("--graphs", action="store_true", help="also print each graph's code")

    bench = sub.add_parser(
        "bench", help="eager vs stock torch.compile vs adaattn, end to end (issue 6)",
        description="Latency, speedups, peak memory, compile time, error against eager fp32 "
        "and the attention sites rewritten, for eager, stock torch.compile and adaattn on each "
        "model x length x batch x policy x mode. Writes results.json/.csv/.md and PNG plots "
        "under --out.")
    add_bench_arguments(bench)

    args = parser.parse_args(argv)
    if args.command == "explain":
        import torch

        import adaattn_compile

        model, margs, mkwargs = _load_factory(args.factory)
        with torch.no_grad():
            report = adaattn_compile.explain(model, *margs, options={"policy": args.policy,
                                                                      "inner": args.inner}, **mkwargs)
        if args.no_graphs:
            text = str(report).split("\nGraphs\n")[0]
        else:
            text = str(report)
        print(text)
        return 0
    if args.command == "bench":
        from .bench import BenchError, run_cli

        try:
            return run_cli(args, argv=_bench_argv(argv))
        except BenchError as exc:
            bench.error(str(exc))
    if args.command == "demo":
        from .demo import run

        run(policy=args.policy, attn_implementation=args.attn, repeat=args.repeat,
            show_graphs=args.graphs)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
