"""``launch.CLaunch``: bound launches through triton 3.6's C launcher, its Python wrappers
skipped. The CPU machine's triton has another launcher, so triton 3.6's wrappers are copied
here (``_make_tensordesc_arg``, ``_wrap_handle_tensordesc`` and ``_CudaLauncher.__call__``,
as triton 3.6.0's ``backends/nvidia/driver.py`` has them) around a recording stand-in for the
C launch: the arguments CLaunch hands the C launch must be the ones triton's wrappers would,
for every descriptor layout the sm90 forward passes (bias tile, O through a descriptor). The
real launcher is checked on the H100 by ``tests/test_flash_fast_path.py`` (results against
a float64 reference, through bound launches)."""
import types

import pytest
import torch

from adaattn_compile.kernels import flash_hopper, launch

# --- triton 3.6.0's wrappers (backends/nvidia/driver.py), the names its code reads -----------
_BASE_ARGS_FORMAT = "iiiKKppOOOOOO"
_BASE_ARGS_FORMAT_LEN = len(_BASE_ARGS_FORMAT)
TMA_DTYPE_DEVICE_TO_HOST = dict((i, i) for i in range(16))
TMA_DTYPE_DEVICE_TO_HOST[8] = 10
TMA_DTYPE_DEVICE_TO_HOST[9] = 8
TMA_DTYPE_DEVICE_TO_HOST[10] = 9
_filled = []


def _fill_tma_descriptor(ptr, swizzle, elem_size, elem_type, block_size, shape, strides,
                         padding):
    _filled.append(ptr)
    return ("map", ptr, swizzle, elem_size, elem_type, tuple(block_size), tuple(shape),
            tuple(strides), padding)


triton = types.SimpleNamespace(runtime=types.SimpleNamespace(driver=types.SimpleNamespace(
    active=types.SimpleNamespace(utils=types.SimpleNamespace(
        fill_tma_descriptor=_fill_tma_descriptor)))))


def make_tensordesc_arg(arg, metadata):
    if metadata is None:
        return [arg.base, *arg.shape, *arg.strides, arg.padding == "nan", *arg.shape, *arg.strides]
    swizzle = metadata["swizzle"]
    elem_size = metadata["elem_size"]
    elem_type = metadata["elem_type"]
    block_size = metadata["block_size"]
    fp4_padded = metadata["fp4_padded"]
    shape = arg.shape
    strides = arg.strides
    assert strides[-1] == 1
    padding = 1 if arg.padding == "nan" else 0
    if fp4_padded:
        shape = list(shape)
        shape[-1] *= 2
    cu_tensor_map = triton.runtime.driver.active.utils.fill_tma_descriptor(
        arg.base.data_ptr(), swizzle, elem_size, TMA_DTYPE_DEVICE_TO_HOST[elem_type], block_size,
        shape, strides, padding)
    return [cu_tensor_map, *shape, *strides]


def _wrap_handle_tensordesc(launcher, signature, tensordesc_meta):
    tensordesc_indices = set(
        [i for i, sig in enumerate(signature.values()) if isinstance(sig, str)
         and sig.startswith("tensordesc")])
    if not tensordesc_indices:
        return launcher
    if not tensordesc_meta:
        tensordesc_meta = [None] * len(tensordesc_indices)

    def inner(*args):
        final_args = list(args[:_BASE_ARGS_FORMAT_LEN])
        tensordesc_idx = 0
        for i, arg in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                final_args.extend(make_tensordesc_arg(arg, tensordesc_meta[tensordesc_idx]))
                tensordesc_idx += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)
    return inner


class _Recorder:
    """The C launch's stand-in (no ``__code__``: a C function has none)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


class CudaLauncher:
    def __init__(self, signature, tensordesc_meta, scratch=0):
        self.c = _Recorder()
        self.num_ctas = 1
        self.launch = _wrap_handle_tensordesc(self.c, signature, tensordesc_meta)
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.launch_cooperative_grid = False
        self.launch_pdl = False

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        assert self.global_scratch_size == 0
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid,
                    self.launch_pdl, None, None, *args)


def _kernel(signature, meta, scratch=0):
    return types.SimpleNamespace(run=CudaLauncher(signature, meta, scratch), function=1234,
                                 packed_metadata=(4, 1, 200000))


def _meta(block):
    return {"swizzle": 128, "elem_size": 2, "elem_type": 9, "block_size": list(block),
            "fp4_padded": False}


@pytest.fixture(autouse=True)
def _no_hooks_and_a_stream(monkeypatch):
    monkeypatch.setattr(launch, "hooks", lambda: (None, None))
    monkeypatch.setattr(launch, "_stream", lambda device: 77)
    monkeypatch.setattr(launch, "current_stream", lambda device: 77)
    monkeypatch.setattr(launch, "_C_LAUNCH", True)
    _filled.clear()


def _sm90_signature(bias, o_tma, n_tail):
    sig = {"desc_q": "tensordesc<bf16[1,1,64,64]>", "desc_k": "tensordesc<bf16[1,1,128,64]>",
           "desc_v": "tensordesc<bf16[1,1,128,64]>",
           "desc_b": "tensordesc<bf16[1,1,128,16]>" if bias else "constexpr",
           "desc_o": "tensordesc<bf16[1,1,64,64]>" if o_tma else "constexpr",
           "out": "*bf16", "lse": "*fp32", "mask": "*u8"}
    sig.update({f"t{i}": "i32" for i in range(n_tail)})
    meta = [_meta((1, 1, 64, 64)), _meta((1, 1, 128, 64)), _meta((1, 1, 128, 64))]
    if bias:
        meta.append(_meta((1, 1, 128, 16)))
    if o_tma:
        meta.append(_meta((1, 1, 64, 64)))
    return sig, meta


def _layout(t):
    return list(t.shape), flash_hopper.tma_strides(t)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("o_tma", [False, True])
def test_bound_forward_hands_the_c_launch_what_triton_would(monkeypatch, bias, o_tma):
    tail = (None, 3, 5, 7, 0.125, 1.5, 2.5, 64, True)
    sig, meta = _sm90_signature(bias, o_tma, len(tail))
    kernel = _kernel(sig, meta)
    c = launch.c_launcher(kernel)
    assert c is not None and c.descriptor_positions == frozenset(
        (0, 1, 2) + ((3,) if bias else ()) + ((4,) if o_tma else ()))

    def tensors():
        q = torch.randn(1, 40, 2, 64).transpose(1, 2)   # (B, H, L, D) over (B, L, H, D) memory
        k, v = torch.randn(1, 2, 56, 64), torch.randn(1, 2, 56, 64)
        out = torch.empty(1, 2, 40, 64)
        return q, k, v, torch.ones(1, 1, 1, 56, dtype=torch.uint8), out, torch.empty(1, 2, 40)
    q, k, v, mask, out, lse = tensors()
    layouts = (_layout(q), _layout(k), _layout(v), _layout(out) if o_tma else None)
    tiles = []

    def bias_tile(m, *params):   # a fresh tile each call, as _bias_tile builds it
        tiles.append(torch.randn(1, 1, 56, 16))
        return tiles[-1]
    monkeypatch.setattr(flash_hopper, "_bias_tile", bias_tile)
    bias_params = ((1, 2, 40, 56), (0, 0, 0, 1), True, torch.bfloat16, 1.0) if bias else None
    via_c = flash_hopper.BoundForward(kernel, 9, 0, layouts, tail, bias_params, c)
    via_triton = flash_hopper.BoundForward(kernel, 9, 0, layouts, tail, bias_params, None)
    for _ in range(2):   # the second call: every tensor map from the kept ones
        via_triton(q, k, v, mask, out, lse)
        expected = kernel.run.c.calls.pop()
        if bias:   # (each call builds its tile: the C launch's call gets another)
            expected = tuple(tiles[-1].data_ptr() if x is tiles[-1] else x for x in expected)
        via_c(q, k, v, mask, out, lse)
        got = kernel.run.c.calls.pop()
        if bias:
            got = tuple(tiles[-1].data_ptr() if x is tiles[-1] else x for x in got)
        # the tile descriptors' maps carry the two tiles' addresses: compare the rest
        norm = lambda args: tuple(  # noqa: E731
            ("map", *a[2:]) if isinstance(a, tuple) and a and a[0] == "map" else a for a in args)
        assert norm(got) == norm(expected)
        assert [a[1] for a in got if isinstance(a, tuple) and a and a[0] == "map"][:3] == [
            q.data_ptr(), k.data_ptr(), v.data_ptr()]
    fills = len(_filled)
    via_c(q, k, v, mask, out, lse)   # same addresses: no map encoded (a bias tile is new)
    assert len(_filled) == fills + (1 if bias else 0)
    q2, k2, v2, mask2, out2, lse2 = tensors()
    via_c(q2, k2, v2, mask2, out2, lse2)   # new addresses: new maps, at the new addresses
    got = kernel.run.c.calls.pop()
    maps = [a for a in got if isinstance(a, tuple) and a and a[0] == "map"]
    assert [m[1] for m in maps[:3]] == [q2.data_ptr(), k2.data_ptr(), v2.data_ptr()]
    if o_tma:
        assert maps[-1][1] == out2.data_ptr()


def test_tensor_maps_kept_are_bounded():
    sig, meta = _sm90_signature(False, False, 1)
    c = launch.c_launcher(_kernel(sig, meta))
    t = torch.randn(300, 64)
    for i in range(launch.CLaunch._MAPS_LIMIT + 5):
        c.descriptor(0, t[i:], [1, 1, 300 - i, 64], [1, 1, 64, 1])
    assert 0 < len(c._maps[0]) <= launch.CLaunch._MAPS_LIMIT


def test_a_kernel_without_descriptors_launches_the_c_function_itself():
    kernel = _kernel({"x": "*fp32", "n": "i32"}, None)
    c = launch.c_launcher(kernel)
    assert c is not None and c.descriptor_positions == frozenset()
    x = torch.zeros(3)
    c((2, 1, 1), 5, (x, 3))
    assert kernel.run.c.calls == [(2, 1, 1, 5, 1234, False, False, None, None, (4, 1, 200000),
                                   None, None, None, x, 3)]


@pytest.mark.parametrize("what", ["other launcher", "scratch", "decomposed descriptors",
                                  "other wrapper", "switched off"])
def test_launchers_of_another_shape_are_left_to_triton(monkeypatch, what):
    sig, meta = _sm90_signature(False, False, 1)
    kernel = _kernel(sig, meta, scratch=64 if what == "scratch" else 0)
    if what == "other launcher":
        kernel.run = types.SimpleNamespace(**vars(kernel.run))   # not a CudaLauncher
    elif what == "decomposed descriptors":
        kernel = _kernel(sig, None)
    elif what == "other wrapper":
        inner = kernel.run.launch
        kernel.run.launch = lambda *args: inner(*args)   # closes over other names
    elif what == "switched off":
        monkeypatch.setattr(launch, "_C_LAUNCH", False)
    assert launch.c_launcher(kernel) is None


def test_a_bound_forward_with_hooks_set_goes_through_triton(monkeypatch):
    tail = (None, 3)
    sig, meta = _sm90_signature(False, False, len(tail))
    kernel = _kernel(sig, meta)
    c = launch.c_launcher(kernel)
    q = torch.randn(1, 2, 40, 64)
    layouts = (_layout(q),) * 3 + (None,)
    bound = flash_hopper.BoundForward(kernel, 9, 0, layouts, tail, None, c)
    seen = []
    monkeypatch.setattr(launch, "hooks", lambda: (seen.append, None))
    monkeypatch.setattr(launch, "run_compiled", lambda *args: seen.append(args))
    bound(q, q, q, None, q, q)
    assert len(seen) == 1 and kernel.run.c.calls == []


def test_a_bound_triton_launch_hands_the_c_launch_what_triton_would():
    kernel = _kernel({"q": "*fp32", "out": "*fp32", "n": "i32", "BLOCK": "constexpr"}, None)
    c = launch.c_launcher(kernel)
    x, y = torch.zeros(3), torch.zeros(3)
    via_triton = launch.Bound(kernel, (4, 2, 1), (None, None, 7, 64), 0)
    via_c = launch.Bound(kernel, (4, 2, 1), (None, None, 7, 64), 0, c)
    via_triton(x, y)
    via_c(x, y)
    assert len(kernel.run.c.calls) == 2 and kernel.run.c.calls[0] == kernel.run.c.calls[1]
