import pytest
import torch
import torch.nn.functional as F

from maskspec.model import kernels
from maskspec.model.kernels import linear, uses_fast_linear

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN_AVAILABLE, reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 4, 25])
def test_fast_linear_matches_stock_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 96, generator=gen)
    weight, bias = torch.randn(160, 96, generator=gen), torch.randn(160, generator=gen)
    with torch.no_grad():
        assert uses_fast_linear(x, weight)
        torch.testing.assert_close(linear(x, weight, bias, fast=True), F.linear(x, weight, bias),
                                   atol=1e-4, rtol=1e-5)
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))  # not asked: the stock kernel


@needs_onednn
def test_fast_linear_only_where_it_is_safe():
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert uses_fast_linear(x, weight)
        assert not uses_fast_linear(x.double(), weight.double())  # float64: the exactness tests' dtype
        assert not uses_fast_linear(x.bfloat16(), weight.bfloat16())  # bf16 already goes to oneDNN
    trainable = weight.clone().requires_grad_()
    assert not uses_fast_linear(x, trainable)  # training keeps autograd's kernel
    out = linear(x, trainable, fast=True)
    out.sum().backward()
    assert trainable.grad is not None
