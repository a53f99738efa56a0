"""The fused ReLU + LSQ input quantizer (qsearch.quant.relu_lsq) against the unfused pair,
and the pre-activation ResNet that uses it against the paper's block form.

The reference is ``F.relu`` followed by the eager LSQ autograd function, so a change to the
fused kernels cannot also change what they are compared with."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsearch.models import build_model
from qsearch.quant import Precision, convert, fused, native_lsq
from qsearch.quant.lsq import LSQQuantizer, _LSQFunction
from qsearch.quant.relu_lsq import relu_quantize



@pytest.fixture(params=["native", "compiled"])
def kernels(request):
    """Each fused path in turn: the native loops (qsearch.quant.native_lsq), then the
    compiled kernels with the native loops switched off."""
    if request.param == "native":
        if native_lsq.status() != "native":
            pytest.skip(f"native LSQ loops unavailable: {native_lsq.status()}")
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # with more, large tensors go to the compiled kernels
        yield "native"
        torch.set_num_threads(before)
        return
    if not fused.compile_enabled("cpu"):
        pytest.skip("torch.compile unavailable (no C++ compiler?)")
    native_lsq.set_enabled(False)
    try:
        yield "compiled"
    finally:
        native_lsq.set_enabled(True)


class _Reader(nn.Module):
    """The smallest layer that reads its input through an activation quantizer."""

    def __init__(self, bits: int = 4):
        super().__init__()
        self.a_quant = LSQQuantizer(bits, "act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_quant(x)


def _pair(y0, s0, bits, need_relu, fused_path, channels_last):
    """(relu output or None, quantized, dL/dy, dL/ds) through relu_quantize + the layer, or
    through F.relu + the eager LSQ function."""
    y = y0.clone()
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    layer = _Reader(bits).train()
    layer.a_quant.init_step(torch.relu(y0))  # unsigned, initialised
    layer.a_quant.step.data.copy_(s0)
    s = layer.a_quant.step
    qn, qp = layer.a_quant.bounds()
    g = layer.a_quant.grad_scale(y0)
    if fused_path:
        r, x = relu_quantize(y, layer, need_relu=need_relu)
        q = layer(x)
    else:
        r = F.relu(y)
        q = _LSQFunction.apply(r, s, qn, qp, g)
    gen = torch.Generator().manual_seed(3)
    gq = torch.randn(q.shape, generator=gen)
    loss = (q * gq).sum()
    if need_relu:
        loss = loss + (r * torch.randn(r.shape, generator=gen)).sum()
    loss.backward()
    return (r.detach() if need_relu else None), q.detach(), y.grad, s.grad


@pytest.mark.parametrize("need_relu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_fused_relu_lsq_equals_relu_then_lsq(need_relu, channels_last, bits, kernels):
    """Forward and input gradient bit for bit (ReLU mask, straight-through range, the
    shortcut's gradient added), step gradient within float32 summation error; the outputs keep
    the input's memory layout."""
    torch.manual_seed(bits)
    y0 = torch.randn(8, 16, 24, 24) * 1.5  # both signs, some above the top level
    s0 = torch.tensor([0.21])
    r_f, q_f, gy_f, gs_f = _pair(y0, s0, bits, need_relu, True, channels_last)
    r_e, q_e, gy_e, gs_e = _pair(y0, s0, bits, need_relu, False, channels_last)
    assert torch.equal(q_f, q_e)
    if need_relu:
        assert torch.equal(r_f, r_e)
    assert torch.equal(gy_f, gy_e)
    assert torch.allclose(gs_f, gs_e, rtol=1e-5, atol=1e-7)
    assert float(gy_f[y0 <= 0].abs().max()) == 0.0  # the ReLU's mask
    assert q_f.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_the_layer_passes_the_fused_output_through_once(kernels):
    """The quantizer returns the very tensor the fused kernel made for it (no second
    quantization), and quantizes anything else as usual."""
    layer = _Reader(4).train()
    y = torch.randn(4, 16, 64, 64, requires_grad=True)
    layer.a_quant.init_step(torch.relu(y))
    _, x = relu_quantize(y, layer)
    assert layer(x) is x
    other = torch.relu(y) * 1.01
    assert layer(other) is not other  # quantized: a new tensor


def test_falls_back_to_a_plain_relu_where_it_cannot_fuse():
    """Unquantized layers, a signed or uninitialised quantizer, evaluation, small tensors:
    the helper returns relu(y) twice and the layer does what it always did."""
    y = torch.randn(4, 16, 64, 64)
    conv = nn.Conv2d(16, 16, 3)
    r, x = relu_quantize(y, conv)
    assert x is r and torch.equal(r, F.relu(y))
    layer = _Reader(4).train()
    assert relu_quantize(y.requires_grad_(), layer)[1] is not None  # uninitialised: plain
    assert not layer.a_quant.is_initialized
    layer(F.relu(y))  # the layer's own first call decides unsigned and the step
    layer.eval()
    r, x = relu_quantize(y, layer)
    assert x is r


def _paper_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ResNet-20 in the paper's form: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``
    per block, on the same modules."""
    h = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for b in stage:
            out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
            h = F.relu(out + b.shortcut(h))
    return model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("quantized", [False, True])
def test_preactivation_resnet_computes_the_papers_function(quantized):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    if quantized:
        convert(model, Precision(w_bits=4, a_bits=4))
        model.train()
        model(torch.randn(16, 3, 32, 32))  # initialise the activation steps
        model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), _paper_forward(model, x))


def test_quantized_resnet_trains_the_same_with_and_without_the_fused_kernels(monkeypatch,
                                                                            kernels):
    """A W4A4 ResNet-20 training step: the fused ReLU+LSQ path (taken: its kernels compile,
    or the native loops load) gives the loss and every gradient of the unfused, eager
    path."""
    def step(compile_on: bool):
        monkeypatch.setenv("QSEARCH_COMPILE", "1" if compile_on else "0")
        torch.manual_seed(0)
        model = build_model("resnet20", 10, 3)
        convert(model, Precision(w_bits=4, a_bits=4, first_bits=8, last_bits=8))
        model.train()
        x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        model.to(memory_format=torch.channels_last)
        model(x)  # initialise the activation steps
        model.zero_grad()
        loss = F.cross_entropy(model(x), torch.arange(32) % 10)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for k in (fused.relu_lsq_forward, fused.relu_lsq_forward_q):
        k.reset()
    loss_f, grads_f = step(True)
    if kernels == "compiled":
        assert fused.relu_lsq_forward.compiled_variants
        assert fused.relu_lsq_forward_q.compiled_variants
    else:
        assert not fused.relu_lsq_forward.compiled_variants  # the native loops ran instead
    loss_e, grads_e = step(False)
    assert loss_f == loss_e
    for n, gf in grads_f.items():
        ge = grads_e[n]
        if n.endswith("step"):  # summation order of the step gradient
            assert torch.allclose(gf, ge, rtol=1e-4, atol=1e-6), n
        else:
            tol = 1e-4 * float(ge.abs().max()) + 1e-7
            assert float((gf - ge).abs().max()) <= tol, n
    assert math.isfinite(loss_f)


def test_downsampling_shortcut_is_the_strided_slice_and_keeps_the_layout():
    """Option A's shortcut (subsample, zero-pad the channels) as a 1x1 max-pool: the values
    and gradient of ``x[:, :, ::2, ::2]`` padded, with a channels-last gradient returned
    channels-last (a strided slice's backward returns NCHW)."""
    from qsearch.models.resnet_cifar import BasicBlock

    block = BasicBlock(16, 32, 2)
    x0 = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = block.shortcut(x)
    ref = F.pad(xr[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(out, ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, xr, g)
    assert torch.equal(gx, gr)
    assert gx.is_contiguous(memory_format=torch.channels_last)
