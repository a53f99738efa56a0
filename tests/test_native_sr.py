"""The native stochastic-rounding quantizer (qsearch.quant.native_sr) against the reference
formula of qsearch.quant.fused (``sr_quantize_math``, plain torch) given the same two keys:
bit for bit, for every granularity and layout the gradient quantizer uses."""

from __future__ import annotations

import pytest
import torch

from qsearch.quant import fused, native_sr

pytestmark = pytest.mark.skipif(native_sr.status() != "native",
                                reason=f"native SR quantizer unavailable: {native_sr.status()}")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


CASES = [((6, 5, 3, 7), None), ((6, 5, 3, 7), 0), ((6, 5, 3, 7), 1), ((37, 6), -1),
         ((37, 6), 0), ((64, 16, 8, 8), None), ((64, 16, 8, 8), 1), ((3, 33, 5, 5), 0)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape,keep", CASES)
@pytest.mark.parametrize("content", ["normal", "one-signed", "zeros", "tiny"])
def test_matches_the_reference_bit_for_bit(bits, shape, keep, content):
    gen = torch.Generator().manual_seed(bits * 100 + len(shape))
    g = {"normal": lambda: torch.randn(shape, generator=gen) * 1e-3,
         "one-signed": lambda: torch.rand(shape, generator=gen) + 0.5,
         "zeros": lambda: torch.zeros(shape),
         "tiny": lambda: torch.randn(shape, generator=gen) * 1e-38}[content]()
    g3 = fused.as_3d(g, keep).contiguous()
    for keys in ((12345, -678), (-(2**31), 2**31 - 1), (0, 0)):
        seeds = torch.tensor(keys, dtype=torch.int32)
        ref = fused.sr_quantize_math(g3, seeds, torch.tensor(float(2**bits - 1)))
        assert _same_bits(native_sr.sr_quantize(g3, seeds, bits), ref), (keys, content)


@pytest.mark.parametrize("keep", [None, 0, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_quantizer_gives_the_compiled_kernels_result(keep, channels_last, one_thread):
    """``fused.sr_quantize`` on the native function and on the compiled kernels, from the same
    RNG state: the same keys, so the same tensor, in the gradient's layout."""
    if not fused.compile_enabled("cpu"):
        pytest.skip("torch.compile unavailable")
    g = torch.randn(8, 16, 6, 6) * 1e-2
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    native = fused.sr_quantize(g, 4, keep, generator=torch.Generator().manual_seed(5))
    native_sr.set_enabled(False)
    try:
        compiled = fused.sr_quantize(g, 4, keep, generator=torch.Generator().manual_seed(5))
    finally:
        native_sr.set_enabled(True)
    assert _same_bits(native.contiguous(), compiled.contiguous())
    assert native.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_a_strided_gradient_is_quantized_in_its_logical_order(one_thread):
    """A strided gradient (every other channel of a larger one, whose (A, C, B) view stays
    strided) gets the values of its contiguous copy: the noise follows element indices, not
    memory."""
    g = (torch.randn(8, 32, 5) * 1e-2)[:, ::2, :]
    assert not fused.as_3d(g, 1).is_contiguous()
    for keep in (None, 1):
        got = fused.sr_quantize(g, 4, keep, generator=torch.Generator().manual_seed(9))
        ref = fused.sr_quantize(g.contiguous(), 4, keep,
                                generator=torch.Generator().manual_seed(9))
        assert _same_bits(got.contiguous(), ref)
