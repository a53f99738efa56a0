"""The column gather LTS uses for unfrozen channels (qsearch.quant.column_gather): the native
AVX-512 kernel gives exactly ``index_select``'s values, and everything it does not handle, or
cannot build, falls back to ``index_select`` (building and its failures: test_native.py)."""

from __future__ import annotations

import pytest
import torch

from qsearch.quant import column_gather as cg
from qsearch.quant import native
from qsearch.quant.functional import _gather_channels


def _has_avx512() -> bool:
    return " avx512f " in f"{native.cpu_flags()} "  # the check qsearch itself makes


#: Where the kernel can be built, the tests below must see it used, or a broken kernel would
#: hide behind the fallback.
native_expected = pytest.mark.skipif(
    not (_has_avx512() and native.compiler()),
    reason="needs a C compiler and an AVX-512 CPU")


@native_expected
def test_native_kernel_is_built_here(one_thread):
    assert cg.status() == "native"
    assert cg._usable(torch.zeros(4, 16), torch.tensor([1, 3]))


@pytest.mark.parametrize("width", [16, 32, 64, 3, 48, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 1000])
def test_same_values_as_index_select(width, rows, one_thread):
    g = torch.Generator().manual_seed(width * 1000 + rows)
    m = torch.randn(rows, width, generator=g)
    for k in sorted({1, 2, 7, 8, 15, 16, 17, 31, 33, width - 1, width} & set(range(1, width + 1))):
        picks = torch.randperm(width, generator=g)[:k]
        for idx in (picks.sort().values, picks):  # LTS passes sorted channels; any order works
            got = cg.gather_columns(m, idx)
            assert got.shape == (rows, k) and got.is_contiguous()
            assert torch.equal(got, m.index_select(1, idx)), (width, rows, k)


def test_channels_last_gradient_gathers_in_its_layout(one_thread):
    g = torch.randn(4, 32, 5, 6).contiguous(memory_format=torch.channels_last)
    channels = torch.tensor([0, 5, 6, 17, 31])
    got = _gather_channels(g, channels)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, g.index_select(1, channels))


def test_switches_and_unhandled_inputs_use_index_select(monkeypatch, one_thread):
    m, idx = torch.randn(8, 16), torch.tensor([0, 2])
    assert not cg._usable(m.double(), idx)
    assert not cg._usable(m.t().contiguous().t(), idx)  # not row-major
    assert not cg._usable(torch.randn(8, 24), idx)
    assert not cg._usable(m, idx.int())
    assert not cg._usable(m.requires_grad_(), idx)  # autograd must see the gather
    m = m.detach()
    monkeypatch.setenv("QSEARCH_COMPILE", "0")
    assert cg.native_kernel() is None and cg.status() == "off"
    monkeypatch.delenv("QSEARCH_COMPILE")
    cg.set_enabled(False)
    try:
        assert cg.native_kernel() is None and cg.status() == "off"
    finally:
        cg.set_enabled(True)
