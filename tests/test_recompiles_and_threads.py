"""Recompiles: the built-in GPT-style model at 10 sequence lengths compiles no more often under
adaattn than under stock torch.compile, with default settings and with ``dynamic=True``.
Threads: two threads running one compiled model share its decision cache safely."""
import threading

import pytest
import torch
import torch._dynamo

import adaattn_compile
from adaattn_compile.models import TinyGPT

LENGTHS = [8, 12, 16, 24, 31, 40, 48, 64, 80, 100]


def _compiles(backend, dynamic, model):
    """How many graphs the backend was handed while the model ran at every length (each run
    also checked against eager)."""
    torch._dynamo.reset()
    count = [0]

    def counting(gm, example_inputs):
        count[0] += 1
        return backend(gm, example_inputs)
    compiled = torch.compile(model, backend=counting, dynamic=dynamic)
    with torch.no_grad():
        for length in LENGTHS:
            x = torch.randint(0, 256, (2, length))
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    return count[0]


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_no_more_recompiles_than_stock(dynamic):
    """Stock: dynamo's graphs straight to eager (``inner='eager'`` for ours: the count is
    dynamo's and our passes' guards; Inductor's own, the same under both, are left out to
    keep the CPU suite fast; the figures with Inductor are in RESULTS.md)."""
    torch.manual_seed(0)
    model = TinyGPT(layers=1).eval()
    stock = _compiles(lambda gm, example_inputs: gm.forward, dynamic, model)
    ours = _compiles(adaattn_compile.backend(inner="eager"), dynamic, model)
    assert ours <= stock, (ours, stock)
    assert stock == (2 if dynamic is None else 1)   # (static first, then one dynamic graph)


def test_two_threads_share_one_compiled_model():
    """Both threads run the same compiled model on their own inputs (two lengths each, so the
    planner's decisions for new buckets are made while the other thread runs)."""
    torch.manual_seed(0)
    model = TinyGPT(layers=2).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=adaattn_compile.backend(inner="eager"), dynamic=True)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (2, 16)))   # compile once, before the threads start
    adaattn_compile.reset_stats()
    errors, barrier = [], threading.Barrier(2)

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            barrier.wait()
            for step in range(12):
                x = torch.randint(0, 256, (2, (24, 56, 90)[(seed + step) % 3]), generator=g)
                with torch.no_grad():
                    out, ref = compiled(x), model(x)
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        except Exception as exc:   # reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = adaattn_compile.stats()
    # every call counted once: 2 threads x 12 steps x 2 layers' sites
    assert sum(s["calls"] for s in stats.values()) == 2 * 12 * 2, stats
