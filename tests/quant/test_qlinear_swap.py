import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedq_core.errors import SchemeError
from speedq_core.quant import (
    FakeQuantLinear,
    QuantLinear,
    QuantScheme,
    find_linears,
    quantize_weight,
    swap_linears,
    to_plain_linears,
    to_quant_linears,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(32, 64)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(64, 32, bias=False))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        return self.head(self.block(self.up(x)))


SCHEME = QuantScheme.parse("w4g16g16")


def test_forward_is_linear_with_dequantized_weight():
    lin = nn.Linear(64, 32)
    qw = quantize_weight(lin.weight, SCHEME)
    ql = QuantLinear.from_linear(lin, qw)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 64, dtype=dtype)
        assert torch.equal(ql(x), F.linear(x, qw.dequantize(dtype), lin.bias.to(dtype)))
    assert torch.equal(ql.qweight.dequantize(), qw.dequantize())
    assert torch.equal(ql.to_linear(torch.float32).weight, qw.dequantize())


def test_state_dict_round_trip_and_dtype_cast_keeps_packed_buffers():
    lin = nn.Linear(64, 32)
    ql = QuantLinear.from_linear(lin, quantize_weight(lin.weight, SCHEME))
    fresh = QuantLinear(64, 32, SCHEME)
    fresh.load_state_dict(ql.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), ql(x))
    assert set(ql.state_dict()) == {"codes", "zeros", "scale_codes", "scale2", "min2", "bias"}
    ql.to(torch.bfloat16)
    assert ql.scale2.dtype == torch.float16 and ql.bias.dtype == torch.bfloat16
    assert torch.equal(ql.qweight.dequantize(), fresh.qweight.dequantize())


def test_from_linear_checks_shape():
    with pytest.raises(SchemeError, match="does not fit"):
        QuantLinear.from_linear(nn.Linear(32, 32), quantize_weight(torch.randn(32, 64), SCHEME))


def test_swap_find_and_unswap():
    net = Net()
    assert list(find_linears(net)) == ["up", "block.1", "head"]
    assert list(find_linears(net, prefix="block")) == ["block.1"]
    x = torch.randn(2, 32)
    ref_weights = {n: quantize_weight(m.weight, SCHEME) for n, m in find_linears(net).items()}
    replaced = swap_linears(net, ["up", "block.1"], lambda n, m: QuantLinear.from_linear(m, ref_weights[n]))
    assert replaced == ["up", "block.1"] and isinstance(net.block[1], QuantLinear)
    assert list(find_linears(net)) == ["head"]
    out_q = net(x)
    assert to_plain_linears(net, torch.float32) == ["up", "block.1"]
    assert type(net.up) is nn.Linear and torch.equal(net.up.weight, ref_weights["up"].dequantize())
    assert torch.equal(net(x), out_q)


def test_swap_unknown_name_changes_nothing():
    net = Net()
    with pytest.raises(SchemeError, match="no nn.Linear named 'block.2'.*did you mean 'block.1'"):
        swap_linears(net, ["up", "block.2"], lambda n, m: QuantLinear.from_linear(m, quantize_weight(m.weight, SCHEME)))
    assert type(net.up) is nn.Linear


def test_fake_quant_freezes_exactly():
    net = Net()
    swap_linears(net, ["up", "block.1"], lambda n, m: FakeQuantLinear.from_linear(m, SCHEME))
    x = torch.randn(2, 32)
    out_fake = net(x)
    assert to_quant_linears(net) == ["up", "block.1"] and isinstance(net.up, QuantLinear)
    assert torch.equal(net(x), out_fake)


def test_dequantized_cache_gives_identical_outputs_and_is_released():
    from speedq_core.quant import QuantScheme, quantize_weight
    from speedq_core.quant.qlinear import QuantLinear, dequantized_cache

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = QuantLinear.from_linear(linear, quantize_weight(linear.weight.data, QuantScheme(2, 16, 4, 16)))
    model = torch.nn.Sequential(q)
    x = torch.randn(3, 64)
    plain = model(x)
    with dequantized_cache(model):
        first, second = model(x), model(x)
        assert list(q._dequantized) == [torch.float32]
    assert torch.equal(plain, first) and torch.equal(plain, second)
    assert q._dequantized is None
