"""A small model for the printed-report tests (kept in its own file so line numbers are stable)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReportModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(8, 8, dtype=torch.bool)))

    def forward(self, q, k, v, pad):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~self.tril, float("-inf"))
        a = F.softmax(s.float(), dim=-1).to(q.dtype) @ v
        b = F.scaled_dot_product_attention(q, k, a, attn_mask=pad)
        gate = torch.softmax(q, dim=-2)
        return b * gate


def factory():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    pad = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    return ReportModel(), (q, k, v, pad)
