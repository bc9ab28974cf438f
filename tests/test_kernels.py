import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from maskspec.model import kernels
from maskspec.model.kernels import Kernels, PackCache, linear, uses_onednn

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN_AVAILABLE, reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 4, 25])
def test_onednn_linear_matches_stock_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 96, generator=gen)
    weight, bias = torch.randn(160, 96, generator=gen), torch.randn(160, generator=gen)
    with torch.no_grad():
        assert uses_onednn(x, weight)
        torch.testing.assert_close(linear(x, weight, bias, kernel=Kernels.ONEDNN), F.linear(x, weight, bias),
                                   atol=1e-4, rtol=1e-5)
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))  # not asked: the stock kernel
        assert torch.equal(linear(x, weight, bias, kernel=Kernels.STOCK), F.linear(x, weight, bias))


@needs_onednn
def test_stock_never_calls_onednn(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(7, 192, generator=gen), torch.randn(256, 192, generator=gen), torch.randn(256)
    with torch.no_grad():
        packed = kernels.pack_stacked([weight]) if kernels.PACKING_AVAILABLE else None

    def refuse(*args, **kwargs):
        raise AssertionError("oneDNN called with the stock kernel")

    monkeypatch.setattr(kernels, "linear_packed", refuse)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    with torch.no_grad(), pytest.raises(AssertionError, match="oneDNN called"):
        linear(x, weight, bias, kernel=Kernels.ONEDNN)  # the patch does intercept oneDNN
    with torch.no_grad():
        for rows in (x[:1], x):
            out = linear(rows, weight, bias, kernel=Kernels.STOCK, packed=packed)
            assert torch.equal(out, F.linear(rows, weight, bias))


@needs_onednn
def test_onednn_linear_only_where_it_is_safe():
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert uses_onednn(x, weight)
        assert not uses_onednn(x.double(), weight.double())  # float64: the exactness tests' dtype
        assert not uses_onednn(x.bfloat16(), weight.bfloat16())  # bf16 already goes to oneDNN
    trainable = weight.clone().requires_grad_()
    assert not uses_onednn(x, trainable)  # training keeps autograd's kernel
    out = linear(x, trainable, kernel=Kernels.ONEDNN)
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


def _packed(weight: torch.Tensor) -> tuple[PackCache, torch.Tensor]:
    cache = PackCache()
    cache.refresh({"w": ([weight], None)})
    assert cache.is_fresh("w", ([weight], None))
    return cache, cache.get("w").matrix


@needs_packing
@pytest.mark.parametrize("rows", [2, 5, 25])
def test_packed_weight_gives_the_plain_layouts_result(rows, monkeypatch):
    gen = torch.Generator().manual_seed(10 + rows)
    x = torch.randn(1, rows, 96, generator=gen)
    weight, bias = torch.randn(160, 96, generator=gen), torch.randn(160, generator=gen)
    calls = _count_packed_calls(monkeypatch)
    with torch.no_grad():
        plain = linear(x, weight, bias, kernel=Kernels.ONEDNN)
        assert calls == []
        _, packed_matrix = _packed(weight)
        # Given the packed copy but not asked for it: the plain layout.
        assert calls == [] and torch.equal(linear(x, weight, bias, kernel=Kernels.ONEDNN, packed=packed_matrix), plain)
        assert calls == [] and torch.equal(linear(x, weight, bias, kernel=Kernels.PACKED), plain)  # none given
        packed = linear(x, weight, bias, kernel=Kernels.PACKED, packed=packed_matrix)
    assert calls == [rows]
    assert torch.equal(packed, plain)


@needs_packing
def test_one_row_keeps_the_plain_layout(monkeypatch):
    weight = torch.randn(64, 32)
    _, packed_matrix = _packed(weight)
    calls = _count_packed_calls(monkeypatch)
    with torch.no_grad():
        linear(torch.randn(1, 1, 32), weight, kernel=Kernels.PACKED, packed=packed_matrix)
        linear(torch.randn(3, 32), weight, packed=packed_matrix)  # not asked for a oneDNN kernel
        linear(torch.randn(3, 32), weight, kernel=Kernels.STOCK, packed=packed_matrix)
    assert calls == []


@needs_packing
def test_a_changed_weight_retires_its_packed_copy():
    gen = torch.Generator().manual_seed(4)
    x, weight = torch.randn(6, 48, generator=gen), torch.randn(80, 48, generator=gen)
    source = ([weight], None)
    with torch.no_grad():
        cache, packed_matrix = _packed(weight)
        before = linear(x, weight, kernel=Kernels.PACKED, packed=packed_matrix)
        cache.refresh({"w": source})
        assert cache.get("w").matrix is packed_matrix  # unchanged: not packed again
        weight.mul_(2)  # in place, as an optimizer step does
        assert not cache.is_fresh("w", source)
        cache.refresh({"w": source})
        assert cache.is_fresh("w", source) and cache.get("w").matrix is not packed_matrix
        torch.testing.assert_close(linear(x, weight, kernel=Kernels.PACKED, packed=cache.get("w").matrix),
                                   2 * before)
        weight.data = weight.data * 0.5  # new storage, as module.to(...) swaps it
        assert not cache.is_fresh("w", source)
        cache.refresh({"w": source})
        torch.testing.assert_close(linear(x, weight, kernel=Kernels.PACKED, packed=cache.get("w").matrix), before)
        # A pack belongs to the tensor object: another one with the same storage and version is another source
        # (a freed weight's successor can get its address and version).
        alias = weight.detach()
        assert kernels.tensor_state(alias) == kernels.tensor_state(weight)
        assert not cache.is_fresh("w", ([alias], None))


@needs_packing
def test_a_cache_holds_no_reference_to_its_weights_and_drops_what_refresh_no_longer_names():
    weight, other = torch.randn(16, 8), torch.randn(12, 8)
    cache = PackCache()
    cache.refresh({"w": ([weight], None), "o": ([other], None)})
    assert len(cache) == 2 and "w" in cache
    packed_ref = weakref.ref(cache.get("w").matrix)
    weight_ref = weakref.ref(weight)
    del weight
    gc.collect()
    assert weight_ref() is None  # the cache did not keep the weight alive
    cache.refresh({"o": ([other], None)})
    assert "w" not in cache and "o" in cache
    gc.collect()
    assert packed_ref() is None
    cache.drop("o")
    assert len(cache) == 0


@needs_packing
@pytest.mark.parametrize("rows", [2, 7, 30])
def test_stacked_packing_keeps_the_first_block_bit_identical(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    weight, low_rank = torch.randn(160, 96, generator=gen), torch.randn(8, 96, generator=gen)
    bias = torch.randn(160, generator=gen)
    with torch.no_grad():
        both = kernels.linear_packed(x, kernels.pack_stacked([weight, low_rank]), torch.cat([bias, torch.zeros(8)]))
        assert torch.equal(both[:, :160], linear(x, weight, bias, kernel=Kernels.ONEDNN))
        torch.testing.assert_close(both[:, 160:], x @ low_rank.t(), atol=1e-4, rtol=1e-5)
        # The cache's stacked pack: the same matrix and the bias padded with zeros for the low-rank rows.
        cache = PackCache()
        cache.refresh({"s": ([weight, low_rank], bias)})
        pack = cache.get("s")
        assert torch.equal(pack.bias, torch.cat([bias, torch.zeros(8)]))
        assert torch.equal(kernels.linear_packed(x, pack.matrix, pack.bias), both)


@needs_packing
def test_packing_only_where_the_onednn_path_goes():
    cache = PackCache()
    cache.refresh({"f64": ([torch.randn(8, 4, dtype=torch.float64)], None),
                   "bf16": ([torch.randn(8, 4, dtype=torch.bfloat16)], None),
                   "1d": ([torch.randn(8)], None),
                   "mixed": ([torch.randn(8, 4), torch.randn(2, 4, dtype=torch.float64)], None),
                   "f32": ([torch.randn(8, 4)], None)})
    assert "f64" not in cache and "bf16" not in cache and "1d" not in cache and "mixed" not in cache
    assert "f32" in cache


def test_no_packing_without_the_packing_op(monkeypatch):
    monkeypatch.setattr(kernels, "PACKING_AVAILABLE", False)
    cache = PackCache()
    cache.refresh({"w": ([torch.randn(8, 4)], None)})
    assert len(cache) == 0


@needs_packing
def test_copies_of_a_cache_are_empty():
    import copy
    import pickle

    cache = PackCache()
    cache.refresh({"w": ([torch.randn(8, 4)], None)})
    assert len(cache) == 1
    assert len(copy.deepcopy(cache)) == 0 and len(pickle.loads(pickle.dumps(cache))) == 0
    assert len(cache) == 1
