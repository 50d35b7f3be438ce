"""all-MiniLM-L6-v2 with its real weights, L = 512: which heads the low-rank path would take,
their measured errors, and the whole model's embedding cosine against eager (issue 5).

    ADAATTN_MINILM_DIR=.minilm python3 scripts/lowrank_minilm.py --json out.json

Every attention site goes through our op (``small_call_gflops=0``) and the low-rank path is
offered at this length (``min_seq_len=0``, ``low_rank_min_gflops=0``; the defaults keep
sites this short exact). The
text fills all 512 tokens, so the encoder runs without its all-ones padding mask (the
low-rank path takes no mask; pooling still reads it): the attention is the same. Rows:
policies ``balanced`` (tolerance 1e-2) and ``fast`` (3e-2), and ``rank="low"`` (every head
forced low rank, errors still measured) to show what the check protects against. Cosine:
sentence embeddings (mean pooling, L2 normalised) against eager fp32, the smallest over the
batch.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import adaattn_compile  # noqa: E402
from adaattn_compile import bench  # noqa: E402


class Unmasked(torch.nn.Module):
    """The sentence embedder with the encoder called without its (all-ones) mask."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.embedder.model(input_ids=input_ids,
                                     token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    built = bench.build_model("minilm-sdpa", args.seq, args.batch, device=args.device)
    inputs = {k: v.to(args.device) for k, v in built.make_inputs()[1].items()}
    assert bool(inputs["attention_mask"].all()), "padding: the mask is needed"
    model = Unmasked(built.model).eval()
    with torch.no_grad():
        reference = model(**inputs)
    rows = []
    for name, options in [("balanced", {"policy": "balanced"}), ("fast", {"policy": "fast"}),
                          ("forced low rank", {"policy": "balanced", "rank": "low"})]:
        options = dict(options, min_seq_len=0, low_rank_min_gflops=0, small_call_gflops=0)
        torch._dynamo.reset()
        adaattn_compile.reset_stats()
        compiled = torch.compile(model, backend="adaattn", options=options)
        with torch.no_grad():
            out = compiled(**inputs)
        cosine = torch.nn.functional.cosine_similarity(out.double(), reference.double(),
                                                       dim=-1).min().item()
        sites = adaattn_compile.stats()
        heads_taken = heads_total = 0
        per_site = {}
        for site, entry in sites.items():
            heads = entry.get("heads") or {}
            taken = sorted(h for h, r in heads.items() if r["low_rank"])
            heads_taken += sum(r["low_rank"] for r in heads.values())
            heads_total += sum(r["low_rank"] + r["exact"] for r in heads.values())
            per_site[site] = {"taken": taken,
                              "errors": {h: r["error"] for h, r in sorted(heads.items())},
                              "entropy": {h: r["entropy"] for h, r in sorted(heads.items())}}
        row = dict(policy=name, options=options, cosine_min=cosine, heads_taken=heads_taken,
                   head_calls=heads_total, sites=per_site)
        rows.append(row)
        errors = sorted(e for s in per_site.values() for e in s["errors"].values()
                        if e is not None) or [float("nan")]
        print(f"{name:16s} cosine {cosine:.6f}  heads kept low rank {heads_taken}/{heads_total}"
              f"  sampled errors min {errors[0]:.3g} median {errors[len(errors) // 2]:.3g} "
              f"max {errors[-1]:.3g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__, "seq": args.seq, "batch": args.batch,
                       "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
