"""GPU diagnostic: which kernel TinyGPT's sites take at L=4k, and where the time goes."""
import torch
import adaattn_compile
from adaattn_compile.models import TinyGPT

torch.manual_seed(0)
model = TinyGPT(vocab=1000, dim=1024, heads=8, layers=8, max_len=4096).cuda().bfloat16().eval()
idx = torch.randint(0, 1000, (1, 4096), device="cuda")
ours = torch.compile(model, backend="adaattn", options={"policy": "exact"})
with torch.no_grad():
    for _ in range(3):
        ours(idx)
    adaattn_compile.reset_stats()
    ours(idx)
    print({k: (v["kernel"], v["fallbacks"]) for k, v in adaattn_compile.stats().items()})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours(idx)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
