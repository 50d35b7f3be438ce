"""A first end-to-end look (issue 6 builds the full benchmark): bf16 inference latency of
eager, stock torch.compile and adaattn on models with hand-written and SDPA attention.

    python3 benchmarks/e2e_preview.py [--seq 4096] [--batch 1]
"""
import argparse
import statistics

import torch
import transformers as T

import adaattn_compile  # noqa: F401  (registers the op)
from adaattn_compile.models import TinyGPT


def median_ms(fn, warmup=3, reps=15):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def models(seq):
    yield "TinyGPT (hand-written, causal) 8L d1024 h8", TinyGPT(
        vocab=1000, dim=1024, heads=8, layers=8, max_len=seq)
    for impl in ("eager", "sdpa"):
        cfg = T.LlamaConfig(num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                            hidden_size=2048, intermediate_size=5632, vocab_size=1000,
                            max_position_embeddings=seq, attn_implementation=impl)
        yield f"HF Llama 4L h16/kv4 d2048 ({impl})", T.LlamaModel(cfg)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 inference, "
          f"batch {args.batch} x {args.seq} tokens, median of 15 (CUDA events)")
    print("| model | eager ms | torch.compile ms | adaattn ms | adaattn vs stock | max rel err vs eager |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, model in models(args.seq):
        model = model.cuda().to(torch.bfloat16).eval()
        idx = torch.randint(0, 1000, (args.batch, args.seq), device="cuda")

        def out_of(m):
            y = m(idx)
            return y if isinstance(y, torch.Tensor) else y[0]
        torch._dynamo.reset()
        stock = torch.compile(model)
        ours = torch.compile(model, backend="adaattn", options={"policy": "exact"})
        with torch.no_grad():
            ref = out_of(model).float()
            err = ((out_of(ours).float() - ref).norm() / ref.norm()).item()
            t_eager = median_ms(lambda: out_of(model))
            t_stock = median_ms(lambda: out_of(stock))
            t_ours = median_ms(lambda: out_of(ours))
        print(f"| {name} | {t_eager:.2f} | {t_stock:.2f} | {t_ours:.2f} | {t_stock / t_ours:.2f}x | {err:.1e} |")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
