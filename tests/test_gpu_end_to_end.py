"""On the GPU: compiled HF models end to end through our Triton kernels (forward and one
training step). Skipped on CPU-only machines."""
import pytest
import torch

import adaattn_compile
from helpers import compile_and_run, rel_err
from hf_models import build

pytestmark = pytest.mark.gpu
# these shapes are small: every site through our kernels (not torch's SDPA, see small_call)
OURS = {"inner": "inductor", "small_call_gflops": 0}


def _to(model, args, kwargs, dtype):
    model = model.to("cuda", dtype)
    move = lambda t: t.to("cuda", dtype) if t.is_floating_point() else t.to("cuda")  # noqa: E731
    return model, tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_model_on_gpu_runs_triton_forward_and_training(name, impl, dtype):
    model, args, kwargs, n_attention = build(name, impl, layers=2, seq=256)
    model, args, kwargs = _to(model, args, kwargs, dtype)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    adaattn_compile.reset_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(*args, **kwargs)[0]
    weight = torch.randn(ref.shape, device="cuda", dtype=dtype)
    ref_grads = torch.autograd.grad((ref.float() * weight).sum(), params, allow_unused=True)
    out, sites, _, _ = compile_and_run(model, *args, options=OURS, **kwargs)
    grads = torch.autograd.grad((out[0].float() * weight).sum(), params, allow_unused=True)
    assert len(sites) == n_attention
    assert all(s.decision.kernel == "triton" for s in sites), [s.decision for s in sites]
    stats = adaattn_compile.stats()
    for site in sites:
        assert stats[site.id]["kernel"] == {"triton": 1}, stats[site.id]
        assert stats[site.id]["backward_calls"] == 1 and not stats[site.id]["fallbacks"]
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(out[0], ref) < tol
    pairs = [(g, r) for g, r in zip(grads, ref_grads) if r is not None]
    assert rel_err(torch.cat([g.flatten().float() for g, _ in pairs]),
                   torch.cat([r.flatten().float() for _, r in pairs])) < 5 * tol


def test_tinygpt_inference_fp16_matches_eager():
    from adaattn_compile.models import TinyGPT
    torch.manual_seed(0)
    model = TinyGPT(layers=2, max_len=512).cuda().half().eval()
    idx = torch.randint(0, 256, (2, 512), device="cuda")
    with torch.no_grad():
        ref = model(idx)
        out, sites, _, _ = compile_and_run(model, idx, options=OURS)
    assert len(sites) == 2 and all(s.causal and s.decision.kernel == "triton" for s in sites)
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_small_sites_stay_torch_sdpa_on_gpu(impl):
    """At the default small_call_gflops a small model's sites stay torch's SDPA: no op call."""
    model, args, kwargs, n_attention = build("gpt2", impl, layers=2, seq=256)
    model, args, kwargs = _to(model, args, kwargs, torch.float16)
    model.eval()
    adaattn_compile.reset_stats()
    with torch.no_grad():
        ref = model(*args, **kwargs)[0]
        out, sites, _, records = compile_and_run(model, *args, options={"inner": "inductor"},
                                                 **kwargs)
    assert len(sites) == n_attention
    assert all(s.decision.kernel == "sdpa" for s in sites), [s.decision for s in sites]
    assert all("adaattn.attention" not in r.code_after for r in records)
    assert not any(e["calls"] for e in adaattn_compile.stats().values())
    assert rel_err(out[0], ref) < 5e-3
