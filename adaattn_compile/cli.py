"""``adaattn``: explain what the backend rewrites, and run the demo."""
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
    if args.command == "demo":
        from .demo import run

        run(policy=args.policy, attn_implementation=args.attn, repeat=args.repeat,
            show_graphs=args.graphs)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
