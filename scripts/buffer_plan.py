"""The buffers Inductor's code allocates in one forward, under each of our buffer-reuse modes.

    python3 scripts/buffer_plan.py --model llama-eager --seq 512 --layers 4 [--device cpu]

For the benchmark registry's model (fp32 on the CPU by default, inference), compiled by stock
torch.compile and by adaattn with ``ADAATTN_BUFFER_REUSE`` = off / short / on (see
``adaattn_compile/inductor_memory.py``), prints how many buffers the generated code allocates
in one call and their peak: the code's allocator (``empty_strided_cpu`` / ``_cuda``) wrapped,
each buffer counted until its storage is freed. Buffers that extern kernels allocate
themselves are not counted (the same in every mode). Inductor's memory plan is the same
computation on either device, so the CPU shows what a mode does to the plan without a GPU.
"""
import argparse
import os
import tempfile
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="buffer-plan-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import adaattn_compile  # noqa: E402,F401  (registers the backend)
from adaattn_compile.bench import build_model  # noqa: E402

ALLOCATORS = ("empty_strided_cpu", "empty_strided_cuda")


def planned_buffers(model, args, kwargs, backend: str, reuse: str) -> dict:
    from torch._inductor.codecache import PyCodeCache
    os.environ["ADAATTN_BUFFER_REUSE"] = reuse
    torch._dynamo.reset()
    loaded_before = len(PyCodeCache.modules)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(*args, **kwargs)
    state = {"live": 0, "peak": 0, "count": 0}

    def freed(nbytes):
        state["live"] -= nbytes

    def tracking(allocate):
        def allocate_tracked(size, stride, dtype):
            t = allocate(size, stride, dtype)
            nbytes = t.untyped_storage().nbytes()
            state["live"] += nbytes
            state["count"] += 1
            state["peak"] = max(state["peak"], state["live"])
            weakref.finalize(t.untyped_storage(), freed, nbytes)
            return t
        return allocate_tracked

    for module in PyCodeCache.modules[loaded_before:]:
        for name in ALLOCATORS:
            if hasattr(module, name):
                setattr(module, name, tracking(getattr(module, name)))
    with torch.no_grad():
        compiled(*args, **kwargs)
    return {"allocations": state["count"], "peak_mib": state["peak"] / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-eager")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", default="real", help="real, or tiny")
    args = ap.parse_args()
    built = build_model(args.model, args.seq, 1, dtype=torch.float32, device=args.device,
                        scale=args.scale, layers=args.layers)
    inputs, kwargs = built.make_inputs()
    inputs = tuple(x.to(args.device) if isinstance(x, torch.Tensor) else x for x in inputs)
    kwargs = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
    model = built.model.eval()
    for backend, reuse in (("inductor", "on"), ("adaattn", "off"), ("adaattn", "short"),
                           ("adaattn", "on")):
        got = planned_buffers(model, inputs, kwargs, backend, reuse)
        label = "stock" if backend == "inductor" else f"adaattn, reuse {reuse}"
        print(f"{args.model} L={args.seq} layers={args.layers or built.layers} {label}: "
              f"{got['allocations']} allocations, peak {got['peak_mib']:.2f} MiB", flush=True)


if __name__ == "__main__":
    main()
