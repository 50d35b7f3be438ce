"""Training under DDP and FSDP2, compiled with adaattn, stock torch.compile, or not at all.

Run it under torchrun, one process a device (NCCL on GPUs, gloo on CPU)::

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed.py \\
        --parallel ddp --model gpt --seq 2048 --batch 8 --out results/

Two phases, each on every rank:

* check (``--check-steps``, fp32 with TF32 off): the model trains a few SGD steps uncompiled and
  compiled with ``backend="adaattn"``; the losses, the first step's gradients (the full tensors,
  FSDP2's shards gathered) and the final parameters are compared, and the attention sites of
  every graph piece are listed (DDP's optimizer splits the forward at bucket bounds, FSDP2
  graph-breaks at every sharded block), with the kernel each site ran.
* throughput (``--steps``, bf16 autocast, AdamW): training tokens per second for each of
  ``--compilers`` (eager, inductor = stock torch.compile, adaattn), timed in the same process.

Rank 0 writes ``<out>/dist-<parallel>-<world>-<model>.json``; ``--table DIR...`` prints every
such file under the DIRs as one Markdown table (tokens/s side by side, speed-up over inductor).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

COMPILERS = ("eager", "inductor", "adaattn")
PARALLEL = ("none", "ddp", "fsdp2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parallel", choices=PARALLEL, default="ddp")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: a GPU a process (NCCL) where there are enough, else CPU (gloo)")
    p.add_argument("--model", default="gpt", help="a model of `adaattn bench --list-models`")
    p.add_argument("--scale", choices=("real", "tiny"), default="real")
    p.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--check-steps", type=int, default=3, help="0: skip the check")
    p.add_argument("--check-seq", type=int, default=None, help="sequence length of the check "
                   "(default --seq)")
    p.add_argument("--check-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps; 0: skip the throughput")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--compilers", default=",".join(COMPILERS))
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--out", default=None, help="directory for rank 0's JSON")
    p.add_argument("--profile", action="store_true", help="after the timing, profile two "
                   "steps of each compiler and write each rank's top ops to --out")
    p.add_argument("--table", metavar="DIR", nargs="+", default=None,
                   help="print the dist-*.json files under the DIRs (recursively) as one "
                        "Markdown table and exit")
    args = p.parse_args(argv)
    compilers = [c for c in args.compilers.split(",") if c]
    bad = [c for c in compilers if c not in COMPILERS]
    if bad:
        p.error(f"argument --compilers: bad value {bad[0]!r}; allowed: {', '.join(COMPILERS)}")
    args.compilers = compilers
    return args


# --------------------------------------------------------------------------------------------
# Setting up one rank
# --------------------------------------------------------------------------------------------

def init(device: str = "auto") -> str:
    """Joins the process group; the device this rank trains on."""
    if device == "auto":
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        device = ("cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= ranks_here
                  else "cpu")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def repeated_layers(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks: the longest ModuleList (TinyGPT.blocks, Llama's layers, GPT-2's
    h, BERT's encoder.layer), each sharded on its own under FSDP2."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(model: nn.Module, parallel: str, device: str, bucket_mb: float) -> nn.Module:
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DDP(model, device_ids=ids, bucket_cap_mb=bucket_mb)
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # The mesh on this rank's own device type: the default follows CUDA where it is present.
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
        for block in repeated_layers(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def batch_for(template, step: int, rank: int, device: str):
    """The template inputs with every tensor's elements shuffled per (step, rank): valid token
    ids, different data on each rank and step, the same in every compiler's run."""
    gen = torch.Generator().manual_seed(1000 * step + rank)

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        flat = x.reshape(-1)
        return flat[torch.randperm(flat.numel(), generator=gen)].view_as(x).to(device)
    args, kwargs = template
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


class Trainer:
    """A model built from the benchmark registry, wrapped for ``parallel`` and compiled."""

    def __init__(self, args, compiler: str, seq: int, batch: int, device: str):
        from adaattn_compile.bench import build_model
        torch._dynamo.reset()
        self.device, self.rank = device, dist.get_rank()
        built = build_model(args.model, seq, batch, device=device, scale=args.scale,
                            layers=args.layers)
        self.tokens_per_step = batch * built.tokens
        self.template = built.make_inputs()
        self.model = wrap(built.model, args.parallel, device, args.bucket_mb)
        self.runner = (self.model if compiler == "eager" else
                       torch.compile(self.model, backend=compiler))
        self.target: Optional[torch.Tensor] = None

    def loss(self, step: int) -> torch.Tensor:
        from adaattn_compile.bench import main_tensor
        args, kwargs = batch_for(self.template, step, self.rank, self.device)
        out = main_tensor(self.runner(*args, **kwargs))
        if self.target is None:
            # The mean squared error to a fixed random target, the same on every rank: it has
            # a gradient through a LayerNorm'd output and, unlike a random projection's mean,
            # is far from zero, so that the check's relative loss difference means something.
            gen = torch.Generator().manual_seed(1)
            self.target = torch.randn(out.shape, generator=gen).to(out.device)
        return torch.nn.functional.mse_loss(out.float(), self.target)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor (FSDP2's shards gathered) or of a tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double().cpu()


# --------------------------------------------------------------------------------------------
# Check: the compiled model trains as the uncompiled one does
# --------------------------------------------------------------------------------------------

def _train_for_check(args, compiler: str, device: str):
    from adaattn_compile.compiler import record_graphs
    seq, batch = args.check_seq or args.seq, args.check_batch or args.batch
    trainer = Trainer(args, compiler, seq, batch, device)
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.05)
    losses, first_grads = [], None
    with record_graphs() as records:
        for step in range(args.check_steps):
            loss = trainer.loss(step)
            loss.backward()
            if first_grads is None:
                first_grads = [None if p.grad is None else _full(p.grad)
                               for p in trainer.model.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    params = [_full(p) for p in trainer.model.parameters()]
    return losses, first_grads, params, records


def _rel(a: List[Optional[torch.Tensor]], b: List[Optional[torch.Tensor]]) -> float:
    """sqrt(sum ||a - b||^2 / sum ||b||^2) over the tensors present in both."""
    num = den = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def pieces_of(records) -> List[Dict[str, Any]]:
    """One entry per compiled graph piece: its attention sites and the kernels they ran."""
    from adaattn_compile.stats import stats as site_stats
    snapshot = site_stats()
    out = []
    for r in records:
        sites = []
        for s in r.sites:
            run = snapshot.get(s.id, {})
            sites.append({"id": s.id, "pattern": s.pattern, "causal": s.causal,
                          "planned": s.decision.kernel, "ran": run.get("kernel", {}),
                          "backward_calls": run.get("backward_calls", 0),
                          "run_time_masks": run.get("run_time_masks", {}),
                          "fallbacks": run.get("fallbacks", [])})
        out.append({"graph": r.name, "sites": sites, "skipped": len(r.skipped),
                    "error": r.error})
    return out


def check(args, device: str) -> Dict[str, Any]:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_losses, ref_grads, ref_params, _ = _train_for_check(args, "eager", device)
        losses, grads, params, records = _train_for_check(args, "adaattn", device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {
        "steps": args.check_steps,
        "losses_eager": ref_losses, "losses_adaattn": losses,
        "loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses)),
        "grad_rel_l2": _rel(grads, ref_grads),
        "param_rel_l2": _rel(params, ref_params),
        "pieces": pieces_of(records),
    }


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _max_over_ranks(value: float, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _profile(step, first: int, path: str, device: str) -> None:
    """Two steps under torch.profiler; the ops by their self time on the device (or the
    CPU) written to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for i in range(2):
            step(first + i)
        _sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
        f.write("\n\nby CPU time\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25,
                                          max_name_column_width=70))


def _time_training(step, args, device: str, tokens_per_step: int) -> Dict[str, Any]:
    """First step (compiles), warm-up, then ``args.steps`` timed steps; the slowest rank's."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step(0)
    _sync(device)
    row = {"first_step_s": _max_over_ranks(time.perf_counter() - start, device)}
    for i in range(1, args.warmup):
        step(i)
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    _sync(device)
    seconds = _max_over_ranks(time.perf_counter() - start, device)
    world = dist.get_world_size()
    row.update(step_ms=1e3 * seconds / args.steps,
               tokens_per_s=world * tokens_per_step * args.steps / seconds,
               tokens_per_step=world * tokens_per_step)
    if device.startswith("cuda"):
        row["peak_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30, device)
    return row


def throughput(args, compiler: str, device: str) -> Dict[str, Any]:
    from adaattn_compile.compiler import record_graphs
    from torch._dynamo.utils import counters
    row: Dict[str, Any] = {"compiler": compiler}
    trainer = opt = None
    try:
        trainer = Trainer(args, compiler, args.seq, args.batch, device)
        counters.clear()
        # fused AdamW on plain CUDA tensors; FSDP2's DTensor shards take the default
        fused = {"fused": True} if device.startswith("cuda") and args.parallel != "fsdp2" else {}
        opt = torch.optim.AdamW(trainer.model.parameters(), lr=1e-4, **fused)
        amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

        def step(i: int) -> None:
            with amp:
                loss = trainer.loss(i)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with record_graphs() as records:
            row.update(_time_training(step, args, device, trainer.tokens_per_step))
        # Graphs Dynamo captured over the whole run (several: graph breaks or recompiles) and
        # the attention sites adaattn rewrote in them.
        row.update(graphs=int(counters["stats"]["unique_graphs"]),
                   graph_breaks=int(sum(counters["graph_break"].values())),
                   attention_sites=sum(len(r.sites) for r in records))
        if args.profile and args.out:
            # every rank steps (the collectives need them all); each writes its own table
            os.makedirs(args.out, exist_ok=True)
            _profile(step, args.warmup + args.steps, os.path.join(
                args.out, f"profile-{args.parallel}-{args.model}-{compiler}"
                          f"-rank{dist.get_rank()}.txt"), device)
    except Exception as exc:  # one compiler failing leaves the others' rows
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        trainer = opt = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _piece_lines(pieces: List[Dict[str, Any]]) -> List[str]:
    lines = []
    for p in pieces:
        ran: Dict[str, int] = {}
        for s in p["sites"]:
            for kernel, n in s["ran"].items():
                ran[kernel] = ran.get(kernel, 0) + n
        kernels = ", ".join(f"{k} x{n}" for k, n in ran.items()) or "-"
        backward = sum(s["backward_calls"] for s in p["sites"])
        proven = sum(sum(s.get("run_time_masks", {}).values()) for s in p["sites"])
        lines.append(f"  {p['graph']}: {len(p['sites'])} attention site(s), "
                     f"{p['skipped']} skipped; forward ran: {kernels}; backward calls: "
                     f"{backward}" + (f"; masks proven causal/empty at run time: {proven}"
                                      if proven else "") +
                     (f"; error: {p['error']}" if p["error"] else ""))
    return lines


def describe(result: Dict[str, Any]) -> str:
    head = (f"{result['parallel']} x{result['world']} {result['model']} "
            f"({result['device_name']})")
    lines = [head]
    chk = result.get("check")
    if chk:
        lines.append(f" check ({chk['steps']} SGD steps, fp32): loss rel diff "
                     f"{chk['loss_rel_diff']:.2e}, first-step grad rel L2 "
                     f"{chk['grad_rel_l2']:.2e}, params rel L2 {chk['param_rel_l2']:.2e}; "
                     f"{len(chk['pieces'])} graph piece(s)")
        lines.extend(_piece_lines(chk["pieces"]))
    for row in result.get("throughput", []):
        if "error" in row:
            lines.append(f" {row['compiler']:>8}: failed: {row['error']}")
        else:
            peak = f", peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else ""
            lines.append(f" {row['compiler']:>8}: {row['tokens_per_s']:>10.0f} tok/s, step "
                         f"{row['step_ms']:.1f} ms{peak}, first step {row['first_step_s']:.1f} s, "
                         f"{row['graphs']} graph(s), {row['graph_breaks']} graph break(s), "
                         f"{row['attention_sites']} site(s) rewritten")
    return "\n".join(lines)


def table(directories: List[str]) -> str:
    """Every result under ``directories`` as one Markdown table, one row per run (model,
    parallel, world), tokens/s of each compiler and adaattn's speed-up over inductor and
    eager."""
    files = sorted({f for d in directories
                    for f in glob.glob(os.path.join(d, "**", "dist-*.json"), recursive=True)})
    results = [json.load(open(f)) for f in files]
    out = ["| model | parallel | GPUs | seq x batch/GPU | eager tok/s | inductor tok/s | "
           "adaattn tok/s | vs inductor | vs eager | check: loss / grad rel |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = {row["compiler"]: row.get("tokens_per_s") for row in r.get("throughput", [])}

        def fmt(c):
            return f"{tps[c]:.0f}" if tps.get(c) else ("failed" if c in tps else "-")

        def ratio(c):
            a, b = tps.get("adaattn"), tps.get(c)
            return f"{a / b:.2f}x" if a and b else "-"
        chk = r.get("check")
        checked = (f"{chk['loss_rel_diff']:.1e} / {chk['grad_rel_l2']:.1e}" if chk else "-")
        out.append(f"| {r['model']} | {r['parallel']} | {r['world']} | {r['seq']} x "
                   f"{r['batch']} | {fmt('eager')} | {fmt('inductor')} | {fmt('adaattn')} | "
                   f"{ratio('inductor')} | {ratio('eager')} | {checked} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    import adaattn_compile  # noqa: F401  (registers the backend)
    device = init(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.parallel == "none" and world > 1:
        raise SystemExit("--parallel none runs one process (torchrun --nproc_per_node=1)")
    result: Dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv, "parallel": args.parallel, "world": world, "model": args.model,
        "scale": args.scale, "layers": args.layers, "seq": args.seq, "batch": args.batch,
        "torch": torch.__version__,
        "device_name": (torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"),
    }
    if args.check_steps:
        result["check"] = check(args, device)
    if args.steps:
        result["throughput"] = [throughput(args, c, device) for c in args.compilers]
    text = describe(result)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        # Every rank writes its own result (their stdout interleaves mid-line); rank 0's is
        # also the run's result, which --table reads.
        names = [f"rank{rank}.json"] + (
            [f"dist-{args.parallel}-{world}-{args.model}.json"] if rank == 0 else [])
        for name in names:
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(dict(result, rank=rank), f, indent=1)
    if rank == 0:
        print(text, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
