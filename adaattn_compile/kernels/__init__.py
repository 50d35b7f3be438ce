"""Attention kernels: one family per module, each with its own launcher.

- ``reference``: the torch path (any device, any dtype); also the fallback for everything else.
- ``flash``: dense FlashAttention-2 style Triton kernels (forward and backward).
- ``flash_hopper``: the dense forward for sm90 in Gluon (FlashAttention-3's schedule).
- ``attn8``: the 8-bit forward (pre-pass and Triton kernel); ``attn8_hopper``: its sm90 kernel
  in Gluon.
- ``lowrank``: the low-rank approximation.
"""


def clear_compiled() -> None:
    """Forget every kernel compiled (and config tuned, launch bound) in this process: the next
    call of each specialisation compiles again, as in a new process. The benchmark's cold
    compiles call it: triton's compiled kernels live on the JIT functions, not in the Inductor
    and triton cache folders that a cold cache replaces, so a model compiled after another one
    with the same kernel specialisations reused them and its compile time read low."""
    from . import attn8, flash, flash_hopper, launch
    flash.clear_compiled()
    flash_hopper.clear_compiled()
    attn8.clear_compiled()
    launch.clear()
