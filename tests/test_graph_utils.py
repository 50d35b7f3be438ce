"""constant_value: which graphs it evaluates (masks built from index arithmetic) and which it
must refuse (anything written in place after creation, anything fed by an input). Graphs are
built by hand so that every spelling some torch version traces is covered: on torch 2.11 Dynamo
records ``a == b`` as ``call_method('__eq__')``, on 2.13 as ``operator.eq``."""
import operator

import pytest
import torch
import torch.fx as fx

from adaattn_compile.passes.graph_utils import constant_value

N = 6


def _mask_graph(spelling: str, write_in_place: bool = False) -> fx.GraphModule:
    g = fx.Graph()
    q_idx = g.call_function(torch.arange, (N,))
    kv_idx = g.call_function(torch.arange, (N,))
    q_col = g.call_method("unsqueeze", (q_idx, -1))
    kv_row = g.call_method("unsqueeze", (kv_idx, 0))
    if spelling == "method":
        keep = g.call_method("__le__", (kv_row, q_col))
        same = g.call_method("__eq__", (q_col, q_col))
        both = g.call_method("__and__", (keep, same))
    else:
        keep = g.call_function(operator.le, (kv_row, q_col))
        same = g.call_function(operator.eq, (q_col, q_col))
        both = g.call_function(operator.and_, (keep, same))
    if write_in_place:
        g.call_method("__iand__", (both, g.call_function(torch.zeros, (N, N), {"dtype": torch.bool})))
    g.output(both)
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("spelling", ["method", "operator"])
def test_index_mask_is_evaluated(spelling):
    gm = _mask_graph(spelling)
    mask_node = list(gm.graph.nodes)[-2]
    value = constant_value(mask_node, gm)
    assert isinstance(value, torch.Tensor)
    assert torch.equal(value, torch.ones(N, N, dtype=torch.bool).tril())


@pytest.mark.parametrize("spelling", ["method", "operator"])
def test_mask_written_in_place_is_not_evaluated(spelling):
    gm = _mask_graph(spelling, write_in_place=True)
    mask_node = next(n for n in gm.graph.nodes if n.target in ("__and__", operator.and_))
    assert constant_value(mask_node, gm) is None


def test_input_dependent_mask_is_not_evaluated():
    g = fx.Graph()
    x = g.placeholder("x")
    idx = g.call_function(torch.arange, (N,))
    keep = g.call_method("__lt__", (idx, x))
    g.output(keep)
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert constant_value(keep, gm) is None
