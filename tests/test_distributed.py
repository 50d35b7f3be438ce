"""A compiled model trains under DDP and FSDP2 (torchrun, 2 processes, gloo on CPU) with the
same losses and parameters as the uncompiled run, and attention rewritten in the graph pieces."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_training_under(mode, tmp_path):
    script = Path(__file__).with_name("dist_train.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "ddp" if mode == "ddp" else "fsdp", str(tmp_path)],
        capture_output=True, text=True, timeout=400)
    lines = [line for path in sorted(tmp_path.glob("rank*.txt"))
             for line in re.findall(r"RESULT .*", path.read_text())]
    assert result.returncode == 0 and len(lines) == 2, result.stderr[-4000:]
    for line in lines:
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        assert float(fields["loss_diff"]) < 1e-5, line
        assert float(fields["param_diff"]) < 1e-5, line
        pieces = fields["pieces"].split(";")
        assert int(fields["sites"]) >= 1, line
        if mode == "ddp":
            # DDPOptimizer splits the forward at bucket bounds: several pieces, and the
            # attention sites are found inside them.
            assert len(pieces) > 1, line
