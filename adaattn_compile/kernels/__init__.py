"""Attention kernels: one family per module, each with its own launcher.

- ``reference``: the torch path (any device, any dtype); also the fallback for everything else.
- ``flash``: dense FlashAttention-2 style Triton kernels (forward and backward).
"""
