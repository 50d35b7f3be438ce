"""HuggingFace models (tiny configs, random weights): every attention site found, output
within 1e-5 relative of eager (fp32, policy exact), for eager and sdpa attention."""
import pytest
import torch

from helpers import compile_and_run, rel_err
from hf_models import MODELS, build


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_hf_model_sites_and_accuracy(name, impl):
    model, args, kwargs, n_attention = build(name, impl)
    model.eval()
    with torch.no_grad():
        ref = model(*args, **kwargs)[0]
        out, sites, skipped, _ = compile_and_run(model, *args, **kwargs)
    assert len(sites) == n_attention, [s.pattern for s in sites]
    assert skipped == []
    assert rel_err(out[0], ref) < 1e-5


@pytest.mark.parametrize("name,impl", [("gpt2", "eager"), ("llama", "eager"), ("bert", "sdpa"),
                                       ("t5", "eager")])
def test_hf_training_step_gradients_match_eager(name, impl):
    model, args, kwargs, n_attention = build(name, impl)
    model.train()
    for module in model.modules():      # dropout off: the RNG streams differ by construction
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(*args, **kwargs)[0]
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)
    out, sites, _, _ = compile_and_run(model, *args, options={"inner": "aot_eager"}, **kwargs)
    grads = torch.autograd.grad((out[0] * weight).sum(), params, allow_unused=True)
    assert len(sites) == n_attention
    assert rel_err(out[0], ref) < 1e-5
    pairs = [(g, r) for g, r in zip(grads, ref_grads) if r is not None]
    assert rel_err(torch.cat([g.flatten() for g, _ in pairs]),
                   torch.cat([r.flatten() for _, r in pairs])) < 1e-5
    scale = max(float(r.norm()) for _, r in pairs)
    for g, r in pairs:   # each parameter, relative to itself or (if ~0) to the largest gradient
        assert float((g - r).norm()) <= 1e-4 * float(r.norm()) + 1e-6 * scale
