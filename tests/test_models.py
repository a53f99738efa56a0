"""Every registered model converts to LSQ QAT and trains (forward + backward) at 2/4/8 bits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsearch.errors import ConfigError
from qsearch.models import build_model, list_models, model_entry, register_model
from qsearch.quant import LSQQuantizer, Precision, QuantLayer, convert

# ImageNet-sized torchvision models run at 64x64 to keep the test fast; they are fully
# convolutional up to a global pool, so the input size does not change the layers.
SMALL_INPUT = {"resnet18": (3, 64, 64), "mobilenet_v2": (3, 64, 64)}


def _input_shape(name: str) -> tuple[int, int, int]:
    if name in SMALL_INPUT:
        return SMALL_INPUT[name]
    c, h, w = (int(v) for v in model_entry(name).input_hint.split("x"))
    return c, h, w


def test_registry_lists_the_built_in_models():
    names = list_models()
    assert {"tiny-cnn", "resnet20", "mobilenetv2", "vgg-small", "resnet18", "mobilenet_v2"} <= set(names)
    assert names == sorted(names)


def test_unknown_model_and_duplicate_registration():
    with pytest.raises(ConfigError) as e:
        build_model("resnet-nope", 10, 3)
    assert e.value.field == "model" and "resnet20" in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny-cnn", description="dup", input_hint="1x8x8")(lambda n, c: nn.Identity())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", list_models())
def test_model_converts_and_trains_at_bits(name, bits):
    torch.manual_seed(0)
    shape = _input_shape(name)
    model = build_model(name, 10, shape[0])
    n_float = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    qlayers = convert(model, Precision(w_bits=bits, a_bits=bits, first_bits=8, last_bits=8))
    # every conv/linear was replaced, none left in float
    assert len(qlayers) == n_float
    assert all(isinstance(m, QuantLayer) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    names = list(qlayers)
    assert qlayers[names[0]].w_bits == 8 and qlayers[names[-1]].w_bits == 8
    assert all(qlayers[n].w_bits == bits and qlayers[n].a_bits == bits for n in names[1:-1])

    model.train()
    x = torch.randn(2, *shape)
    y = torch.tensor([1, 7])
    logits = model(x)
    assert logits.shape == (2, 10)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    for n, q in qlayers.items():
        assert q.weight.grad is not None and torch.isfinite(q.weight.grad).all(), n
        assert q.w_quant.step.grad is not None and torch.isfinite(q.w_quant.step.grad).all(), n
        assert q.a_quant.step.grad is not None, n
        assert bool(q.a_quant.initialized), n  # initialised from this first batch
    # the first layer sees the raw (signed) input; quantizers keep their steps positive
    assert qlayers[names[0]].a_quant.signed
    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            assert m.step.item() > 0 and math.isfinite(m.step.item())
    # a quantized weight only takes values on its grid: at most 2^bits distinct levels
    mid = qlayers[names[len(names) // 2]]
    assert torch.unique(mid.quantized_weight().detach()).numel() <= 2**bits
