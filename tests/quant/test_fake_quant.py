import pytest
import torch
from torch import nn

from speedq_core.errors import SchemeError
from speedq_core.quant import FakeQuantLinear, QuantLinear, QuantScheme, quantize_weight


def linear(dtype=torch.float32, out=32, inp=64):
    torch.manual_seed(0)
    lin = nn.Linear(inp, out).to(dtype)
    with torch.no_grad():
        lin.weight[0, 0] = 2.0   # outlier: its group's range is wide
    return lin


@pytest.mark.parametrize("name", ["w4g16", "w2g16g16", "w4g32g32"])
def test_forward_equals_quantized_weight_path(name):
    scheme = QuantScheme.parse(name)
    lin = linear()
    fake = FakeQuantLinear.from_linear(lin, scheme)
    assert fake.weight is lin.weight
    qw = quantize_weight(lin.weight, scheme)
    assert torch.equal(fake.fake_weight(), qw.dequantize())
    x = torch.randn(5, 64)
    assert torch.equal(fake(x), QuantLinear.from_qweight(qw, lin.bias)(x))
    assert torch.equal(fake.to_quantized_weight().dequantize(), qw.dequantize())


def test_ste_gradient_is_the_masked_identity():
    scheme = QuantScheme.parse("w2g16g16")
    fake = FakeQuantLinear.from_linear(linear(), scheme)
    with torch.no_grad():   # push some weights outside their group's representable range
        fake.weight[3, 0] = 5.0
        fake.weight[4, 1] = -5.0
    x = torch.randn(7, 64)
    upstream = torch.randn(7, 32)
    (fake(x) * upstream).sum().backward()
    qw = quantize_weight(fake.weight.detach(), scheme)
    s, z = qw.scales(), qw.zero.float()
    expected = torch.zeros(32, 64)
    grad_w_hat = upstream.t() @ x
    for r in range(32):
        for c in range(64):
            g = c // 16
            lo, hi = -s[r, g] * z[r, g], s[r, g] * (3 - z[r, g])
            w = fake.weight[r, c].item()
            expected[r, c] = grad_w_hat[r, c] if lo <= w <= hi else 0.0
    assert torch.allclose(fake.weight.grad, expected, atol=1e-5)
    assert (fake.weight.grad == 0).sum() > 0 and (fake.weight.grad != 0).sum() > 1000


def test_bf16_weights_get_bf16_gradients():
    fake = FakeQuantLinear.from_linear(linear(torch.bfloat16), QuantScheme.parse("w4g32"))
    out = fake(torch.randn(3, 64, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and fake.weight.grad.dtype == torch.bfloat16


def test_learnable_scale_zero_trains_and_exports_exactly():
    scheme = QuantScheme.parse("w2g16g16")
    fake = FakeQuantLinear.from_linear(linear(), scheme, learnable="scale_zero")
    assert torch.equal(fake.fake_weight(), quantize_weight(fake.weight, scheme).dequantize())
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    losses = []
    for _ in range(3):
        loss = (fake(x) - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        assert fake.scale.grad.abs().sum() > 0 and fake.zero.grad.abs().sum() > 0
        with torch.no_grad():  # plain SGD (torch.optim's first use costs a second of imports)
            for param in fake.parameters():
                param -= 1e-2 * param.grad
                param.grad = None
    assert losses[-1] < losses[0]
    assert torch.equal(fake.fake_weight().detach(), fake.to_quantized_weight().dequantize())
    assert torch.equal(fake.to_linear(torch.float32).weight, fake.to_quantized_weight().dequantize())


def test_clip_init_is_baked_into_the_weight():
    lin = linear()
    FakeQuantLinear.from_linear(lin, QuantScheme.parse("w4g16"), clip_max=torch.full((32, 1), 0.1))
    assert lin.weight.max() <= 0.1


def test_rejects_bad_options():
    with pytest.raises(SchemeError, match="learnable='lsq'"):
        FakeQuantLinear.from_linear(linear(), QuantScheme.parse("w4g16"), learnable="lsq")
    with pytest.raises(SchemeError, match="does not divide in_features=64"):
        FakeQuantLinear.from_linear(linear(), QuantScheme.parse("w4g128"))
