"""A compiled model trains under DDP and FSDP2 (torchrun, 2 processes, gloo on the CPU, also on
a GPU machine) with the same losses, gradients and parameters as the uncompiled run, and
attention rewritten in the graph pieces: benchmarks/distributed.py, which the two-GPU runs
use with NCCL."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed.py"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_training_under(parallel, tmp_path):
    # GPT-2-small widths with 2 layers: ~100 MB of parameters, several 25 MB DDP buckets.
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), "--device", "cpu", "--parallel", parallel, "--model", "gpt", "--layers", "2", "--seq", "32",
         "--batch", "2", "--check-steps", "3", "--steps", "2", "--warmup", "1",
         "--compilers", "eager,adaattn", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400)
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert result.returncode == 0 and len(ranks) == 2, result.stderr[-4000:]
    for r in ranks:
        check = r["check"]
        assert check["loss_rel_diff"] < 1e-5 and check["grad_rel_l2"] < 1e-5, check
        assert check["param_rel_l2"] < 1e-7, check
        sites = [s for piece in check["pieces"] for s in piece["sites"]]
        assert len(sites) >= 1 and all(not p["error"] for p in check["pieces"])
        # every site ran forward (on CPU: the reference path) and backward through our op
        assert all(sum(s["ran"].values()) > 0 and s["backward_calls"] > 0 for s in sites), sites
        if parallel == "ddp":
            # DDPOptimizer splits the forward at bucket bounds: several pieces, and the
            # attention sites are found inside them.
            assert len(check["pieces"]) > 1, check["pieces"]
        rows = {row["compiler"]: row for row in r["throughput"]}
        assert set(rows) == {"eager", "adaattn"}
        assert all("error" not in row and row["tokens_per_s"] > 0 for row in rows.values()), rows
    assert (tmp_path / f"dist-{parallel}-2-gpt.json").exists()
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout
    assert f"| gpt | {parallel} | 2 | 32 x 2 |" in table, table
