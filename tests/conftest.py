"""Test-session set-up.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here,
before the package is imported: CPU-only machines run our Triton kernels under the interpreter.
Each session gets its own Inductor cache so that a stale cache never hides a bug.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="adaattn-inductor-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpreter = pytest.mark.skip(reason="plans our kernels for CPU tensors: needs "
                                               "TRITON_INTERPRET=1 (CPU-only machines)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
