"""kernels.launch: the direct-launch cache, with a stand-in for a Triton kernel (on CPU the
kernels run under the interpreter, where direct launches are off; the GPU suite runs them for
real through every flash test)."""
import types

import pytest
import torch

from adaattn_compile.kernels import launch


class FakeKernel:
    """What triton's CompiledKernel offers a launcher: run / function / packed_metadata."""

    def __init__(self):
        self.function, self.packed_metadata, self.runs = "fn", "meta", []

    def launch_metadata(self, grid, stream, *values):
        return None

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, leave, *values):
        self.runs.append(((g0, g1, g2), values))


class FakeJit:
    """A @triton.jit stand-in: kernel(X, n, D: constexpr, BLOCK: constexpr, flag: constexpr=7),
    autotuned over BLOCK."""

    def __init__(self):
        P = types.SimpleNamespace
        self.params = [P(name="X", is_constexpr=False, has_default=False, default=None),
                       P(name="n", is_constexpr=False, has_default=False, default=None),
                       P(name="D", is_constexpr=True, has_default=False, default=None),
                       P(name="BLOCK", is_constexpr=True, has_default=False, default=None),
                       P(name="flag", is_constexpr=True, has_default=True, default=7)]
        self.fn = self
        self.best_config = types.SimpleNamespace(kwargs={"BLOCK": 32}, pre_hook=None)
        self.compiled = []      # one kernel per launch through "triton"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiled.append((grid({"BLOCK": 32, **kwargs}), args, kwargs))
            return self.kernel
        return run


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch, "_ENABLED", True)
    monkeypatch.setattr(launch, "_knobs", types.SimpleNamespace(
        runtime=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)))
    monkeypatch.setattr(launch, "_stream", lambda dev: 0)
    launch.clear()
    fn = FakeJit()
    fn.kernel = FakeKernel()
    yield fn
    launch.clear()


def test_second_launch_is_direct_with_full_arguments(fake):
    dev = torch.device("cuda", 0)
    x1, x2 = torch.zeros(8), torch.ones(8)
    launch.launch(fake, lambda m: (100 // m["BLOCK"], 2), (x1, 48, 64), {}, dev)
    assert len(fake.compiled) == 1 and fake.kernel.runs == []
    launch.launch(fake, lambda m: (200 // m["BLOCK"], 3), (x2, 64, 64), {}, dev)
    assert len(fake.compiled) == 1            # not through triton again
    (grid, values), = fake.kernel.runs
    assert grid == (6, 3, 1)                  # this call's grid, the remembered config's BLOCK
    assert values[0] is x2 and values[1:] == (64, 64, 32, 7)
    # the plan keeps no tensor of the first call alive
    assert not any(isinstance(v, torch.Tensor) for p in launch._PLANS.values() for v in p.values)


def test_bound_launch_takes_only_the_tensors(fake):
    dev = torch.device("cuda", 0)
    x1, x2 = torch.zeros(8), torch.ones(8)
    grid = lambda m: (100 // m["BLOCK"], 2)   # noqa: E731
    assert launch.bind(fake, grid, (x1, 48, 64), {}, dev) is None   # nothing launched yet
    launch.launch(fake, grid, (x1, 48, 64), {}, dev)
    bound = launch.bind(fake, grid, (x1, 48, 64), {}, dev)
    assert not any(isinstance(v, torch.Tensor) for v in bound.values)
    bound(x2)
    (g, values), = fake.kernel.runs
    assert g == (3, 2, 1) and values[0] is x2 and values[1:] == (48, 64, 32, 7)
    assert launch.bind(fake, grid, (x1, 33, 64), {}, dev) is None   # another specialisation


@pytest.mark.parametrize("change", ["int_spec", "constexpr", "dtype", "kwarg"])
def test_a_new_specialisation_goes_through_triton(fake, change):
    dev = torch.device("cuda", 0)
    x = torch.zeros(8)
    launch.launch(fake, lambda m: (1,), (x, 32, 64), {}, dev)
    args, kwargs = {"int_spec": ((x, 33, 64), {}),         # 33 is not a multiple of 16
                    "constexpr": ((x, 32, 128), {}),
                    "dtype": ((x.half(), 32, 64), {}),
                    "kwarg": ((x, 32, 64), {"flag": 3})}[change]
    launch.launch(fake, lambda m: (1,), args, kwargs, dev)
    assert len(fake.compiled) == 2 and fake.kernel.runs == []


def test_a_failing_direct_launch_turns_itself_off(fake, monkeypatch):
    dev = torch.device("cuda", 0)
    x = torch.zeros(8)
    launch.launch(fake, lambda m: (1,), (x, 32, 64), {}, dev)

    def broken(*a, **k):
        raise RuntimeError("launcher API changed")
    monkeypatch.setattr(fake.kernel, "run", broken)
    with pytest.warns(UserWarning, match="direct kernel launch failed"):
        launch.launch(fake, lambda m: (1,), (x, 32, 64), {}, dev)
    assert len(fake.compiled) == 2 and launch._ENABLED is False


def test_clear_compiled_forgets_kernels_tunings_and_bound_launches(monkeypatch):
    """kernels.clear_compiled leaves this process as a new one would find it: no compiled
    kernel on any of our JIT functions, no tuned config, no direct or bound launch."""
    from adaattn_compile import kernels
    from adaattn_compile.kernels import flash, flash_hopper

    class Jit:   # triton 3.x keeps a JIT function's kernels in device_caches, older in cache
        def __init__(self):
            self.device_caches = {0: ("kernels",)}
            self.cache = {0: {"key": "kernel"}}
    jits = {name: Jit() for name in flash._KERNELS}
    monkeypatch.setattr(flash, "_KERNELS", jits)
    monkeypatch.setitem(flash._TUNED, ("fwd", "bucket"), object())
    monkeypatch.setitem(flash._FAST_FWD, ("signature",), object())
    monkeypatch.setitem(flash._TMA_FAILED, ("cap",), "error")
    monkeypatch.setitem(flash._SM90_FAILED, ("cap",), "error")
    monkeypatch.setitem(flash_hopper._LAUNCHERS, ("key",), object())
    monkeypatch.setitem(launch._PLANS, ("plan",), object())
    kernels.clear_compiled()
    assert all(not j.device_caches and not j.cache for j in jits.values())
    assert not flash._TUNED and not flash._FAST_FWD
    assert not flash._TMA_FAILED and not flash._SM90_FAILED
    assert not flash_hopper._LAUNCHERS and not launch._PLANS
