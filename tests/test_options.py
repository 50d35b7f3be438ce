"""Backend registration and option validation."""
import subprocess
import sys

import pytest
import torch

import adaattn_compile
from adaattn_compile.options import OptionError, Options


def test_entry_point_in_a_fresh_interpreter():
    """backend="adaattn" works in an interpreter that never imported adaattn_compile."""
    code = (
        "import sys, torch\n"
        "assert 'adaattn_compile' not in sys.modules\n"
        "f = torch.compile(lambda q: torch.softmax(q @ q.transpose(-1, -2), -1) @ q, backend='adaattn',\n"
        "                  options={'inner': 'eager'})\n"
        "q = torch.randn(2, 3, 5, 4)\n"
        "out = f(q)\n"
        "ref = torch.softmax(q @ q.transpose(-1, -2), -1) @ q\n"
        "assert (out - ref).abs().max() < 1e-5\n"
        "import adaattn_compile\n"
        "assert adaattn_compile.stats(), 'the op never ran'\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_backend_callable_equals_named_backend():
    backend = adaattn_compile.backend(policy="fast", inner="eager")
    assert backend.options.policy == "fast"
    f = torch.compile(lambda x: torch.softmax(x @ x.mT, -1) @ x, backend=backend)
    x = torch.randn(2, 4, 3)
    assert torch.allclose(f(x), torch.softmax(x @ x.mT, -1) @ x, atol=1e-6)


@pytest.mark.parametrize("options,match", [
    ({"polcy": "fast"}, "'polcy'"),
    ({"policy": "turbo"}, "'policy'.*exact, balanced, fast"),
    ({"tolerance": -1}, "'tolerance'"),
    ({"tolerance": "big"}, "'tolerance'"),
    ({"min_seq_len": 1.5}, "'min_seq_len'"),
    ({"inner": "tvm"}, "'inner'.*inductor, aot_eager, eager"),
    ({"precision": "int4"}, "'precision'"),
    ({"rank": -3}, "'rank'"),
    ({"kernel": "cuda"}, "'kernel'"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(OptionError, match=match):
        Options.parse(options)
    with pytest.raises(OptionError, match=match):
        adaattn_compile.backend(**options)


def test_bad_option_through_torch_compile_names_it():
    f = torch.compile(lambda x: x + 1, backend="adaattn", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown option.*'bogus'.*allowed"):
        f(torch.randn(3))


@pytest.mark.parametrize("alias,canonical", [("quality", "exact"), ("speed", "fast"),
                                             ("balanced", "balanced")])
def test_policy_aliases(alias, canonical):
    opts = Options.parse({"policy": alias})
    assert opts.policy == canonical
    assert opts.tolerance == {"exact": 0.0, "balanced": 1e-2, "fast": 3e-2}[canonical]


def test_defaults():
    opts = Options.parse()
    assert (opts.policy, opts.inner, opts.precision, opts.rank, opts.kernel) == \
        ("balanced", "inductor", "auto", "auto", "auto")
