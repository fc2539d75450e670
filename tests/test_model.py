"""The course CNN: architecture, init schemes, activations and weight-decay parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarlab.model import ACTIVATIONS, INITS, CifarCNN, parameter_groups


def test_architecture_matches_the_course():
    net = CifarCNN(num_classes=10, dropout=0.5)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
        (64, 128, (3, 3), (1, 1)),
    ]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(2048, 256), (256, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert net(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert CifarCNN(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # 3·32·9+32 + 32·64·9+64 + 64·128·9+128 + 2048·256+256 + 256·10+10
    assert sum(p.numel() for p in net.parameters()) == 620_362


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_init_and_activation(init, activation):
    torch.manual_seed(0)
    net = CifarCNN(init=init, activation=activation)
    acts = {type(m).__name__.lower() for m in net.modules()}
    assert {"relu": "relu", "leaky_relu": "leakyrelu", "sigmoid": "sigmoid", "tanh": "tanh"}[
        activation
    ] in acts
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if init == "default":
        assert any(layer.bias.abs().sum() > 0 for layer in layers)  # PyTorch's own uniform biases
    else:
        assert all(torch.count_nonzero(layer.bias) == 0 for layer in layers)  # the course zeroes biases
    out = net(torch.randn(8, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_kaiming_and_xavier_scales():
    """He init keeps Var(w) = 2/fan_in for ReLU; Xavier uses 2/(fan_in + fan_out)."""
    torch.manual_seed(0)
    fc = CifarCNN(init="kaiming_normal").classifier[1]
    assert fc.weight.var().item() == pytest.approx(2 / 2048, rel=0.05)
    fc = CifarCNN(init="xavier_normal", activation="tanh").classifier[1]
    gain = nn.init.calculate_gain("tanh")
    assert fc.weight.var().item() == pytest.approx(gain**2 * 2 / (2048 + 256), rel=0.05)
    fc = CifarCNN(init="orthogonal").classifier[4]  # (10, 256): rows orthonormal times the relu gain
    w = fc.weight / nn.init.calculate_gain("relu")
    assert torch.allclose(w @ w.T, torch.eye(10), atol=1e-5)


def test_weight_decay_applies_to_weights_not_biases():
    net = CifarCNN()
    groups = parameter_groups(net, 1e-4)
    decayed, plain = groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and len(decayed["params"]) == 5
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 5
    # With SGD and zero gradients, only weights shrink, by exactly lr·wd·w.
    weight, bias = net.classifier[1].weight, net.classifier[1].bias
    nn.init.constant_(bias, 1.0)
    before_w, before_b = weight.detach().clone(), bias.detach().clone()
    opt = torch.optim.SGD(groups, lr=0.1)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(weight, before_w * (1 - 0.1 * 1e-4))
    assert torch.equal(bias, before_b)


def test_bad_settings_raise_with_the_key():
    with pytest.raises(ValueError, match="model.dropout=1.0"):
        CifarCNN(dropout=1.0)
    with pytest.raises(ValueError, match="model.init='he'"):
        CifarCNN(init="he")
    with pytest.raises(ValueError, match="model.activation='gelu'"):
        CifarCNN(activation="gelu")
