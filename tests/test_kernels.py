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


needs_packing = pytest.mark.skipif(not kernels.PACKING_AVAILABLE, reason="PyTorch without oneDNN weight packing")


def _count_packed_calls(monkeypatch) -> list[int]:
    """Rows of every call that multiplies by a packed matrix."""
    calls: list[int] = []
    real = kernels.linear_packed

    def counting(x, packed, bias=None):
        calls.append(x.numel() // x.shape[-1])
        return real(x, packed, bias)

    monkeypatch.setattr(kernels, "linear_packed", counting)
    return calls


@needs_packing
@pytest.mark.parametrize("rows", [2, 5, 25])
def test_packed_weight_gives_the_plain_layouts_result(rows, monkeypatch):
    gen = torch.Generator().manual_seed(10 + rows)
    x = torch.randn(1, rows, 96, generator=gen)
    weight, bias = torch.randn(160, 96, generator=gen), torch.randn(160, generator=gen)
    calls = _count_packed_calls(monkeypatch)
    with torch.no_grad():
        plain = linear(x, weight, bias, fast=True)
        assert calls == []
        assert kernels.prepack(weight) and kernels.is_prepacked(weight)
        assert calls == [] and torch.equal(linear(x, weight, bias, fast=True), plain)  # not asked for the copy
        packed = linear(x, weight, bias, fast=True, packed=True)
    assert calls == [rows]
    assert torch.equal(packed, plain)


@needs_packing
def test_one_row_keeps_the_plain_layout(monkeypatch):
    weight = torch.randn(64, 32)
    kernels.prepack(weight)
    calls = _count_packed_calls(monkeypatch)
    with torch.no_grad():
        linear(torch.randn(1, 1, 32), weight, fast=True, packed=True)
        linear(torch.randn(3, 32), weight, packed=True)  # not asked for the fast kernel
    assert calls == []


@needs_packing
def test_a_changed_weight_retires_its_packed_copy():
    gen = torch.Generator().manual_seed(4)
    x, weight = torch.randn(6, 48, generator=gen), torch.randn(80, 48, generator=gen)
    with torch.no_grad():
        assert kernels.prepack(weight)
        before = linear(x, weight, fast=True, packed=True)
        weight.mul_(2)  # in place, as an optimizer step does
        assert not kernels.is_prepacked(weight)
        torch.testing.assert_close(linear(x, weight, fast=True, packed=True), 2 * before)
        assert kernels.prepack(weight)
        torch.testing.assert_close(linear(x, weight, fast=True, packed=True), 2 * before)
        weight.data = weight.data * 0.5  # new storage, as module.to(...) swaps it
        assert not kernels.is_prepacked(weight)
        torch.testing.assert_close(linear(x, weight, fast=True, packed=True), before)


@needs_packing
def test_a_packed_copy_lives_as_long_as_its_weight():
    weight = torch.randn(16, 8)
    kernels.prepack(weight)
    key = id(weight)
    assert key in kernels._packed
    del weight
    assert key not in kernels._packed


@needs_packing
@pytest.mark.parametrize("rows", [2, 7, 30])
def test_stacked_packing_keeps_the_first_block_bit_identical(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    weight, low_rank = torch.randn(160, 96, generator=gen), torch.randn(8, 96, generator=gen)
    bias = torch.randn(160, generator=gen)
    with torch.no_grad():
        both = kernels.linear_packed(x, kernels.pack_stacked([weight, low_rank]), torch.cat([bias, torch.zeros(8)]))
        assert torch.equal(both[:, :160], linear(x, weight, bias, fast=True))
        torch.testing.assert_close(both[:, 160:], x @ low_rank.t(), atol=1e-4, rtol=1e-5)


@needs_packing
def test_prepack_only_where_the_fast_path_goes():
    assert not kernels.prepack(torch.randn(8, 4, dtype=torch.float64))
    assert not kernels.prepack(torch.randn(8, 4, dtype=torch.bfloat16))
    assert not kernels.prepack(torch.randn(8))
