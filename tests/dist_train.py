"""Run by tests/test_distributed.py under torchrun (gloo, CPU): train TinyGPT a few steps under
DDP or FSDP2, uncompiled and compiled with adaattn, and compare losses and parameters."""
import sys

import torch
import torch.distributed as dist

from adaattn_compile.compiler import record_graphs
from adaattn_compile.models import TinyGPT


def train(mode: str, compiled: bool, steps: int = 3):
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyGPT(layers=2, dim=256, heads=4, max_len=64)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Several buckets, so that Dynamo's DDPOptimizer splits the graph at their bounds.
        model = DDP(model, bucket_cap_mb=1)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # a CPU mesh: the default mesh follows CUDA where it is present, and a one-GPU machine
        # has no device for the second rank
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    runner = torch.compile(model, backend="adaattn") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with record_graphs() as records:
        for step in range(steps):
            idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(100 * step + rank))
            logits = runner(idx)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    return losses, params, records


def main(mode: str, out_dir: str):
    dist.init_process_group("gloo")
    eager_losses, eager_params, _ = train(mode, compiled=False)
    losses, params, records = train(mode, compiled=True)
    loss_diff = max(abs(a - b) for a, b in zip(losses, eager_losses))
    param_diff = max(float((p - q).abs().max()) for p, q in zip(params, eager_params))
    pieces = ";".join(f"{r.name}:{len(r.sites)}" for r in records)
    # One file per rank: the ranks' stdout interleaves mid-line.
    with open(f"{out_dir}/rank{dist.get_rank()}.txt", "w") as f:
        f.write(f"RESULT rank={dist.get_rank()} mode={mode} pieces={pieces} "
                f"sites={sum(len(r.sites) for r in records)} loss_diff={loss_diff:.3e} "
                f"param_diff={param_diff:.3e}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
