"""The course's CIFAR CNN as a plain ``nn.Module`` (usable without Lightning) and its init schemes."""

from __future__ import annotations

import torch
from torch import nn

INITS = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal", "orthogonal", "default")
ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh")

_ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
# torch.nn.init.calculate_gain names for the activations above (for Kaiming/Xavier/orthogonal gains).
_GAIN_NAMES = {"relu": "relu", "leaky_relu": "leaky_relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def make_activation(name: str, inplace: bool = False) -> nn.Module:
    if name not in _ACTIVATION_CLASSES:
        raise ValueError(f"model.activation={name!r} is not one of {', '.join(ACTIVATIONS)}")
    if inplace and name in ("relu", "leaky_relu"):
        return _ACTIVATION_CLASSES[name](inplace=True)
    return _ACTIVATION_CLASSES[name]()


class CifarCNN(nn.Module):
    """conv 32→64→128 (3x3, pad 1, act, max-pool 2) → FC 256 → act → dropout → FC classes.

    Input: (B, 3, 32, 32) float images; output: (B, num_classes) logits.

    Each conv block applies its max-pool before its activation: every activation offered is non-decreasing,
    so act(max(x)) = max(act(x)) and the block computes the same function with the same gradients, but the
    activation (and its backward) touches 4x fewer values; ReLU/LeakyReLU also run in place there. On a CPU
    that makes a training step ~25% faster. Parameter names are those of conv → act → pool.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dropout: float = 0.5,
        activation: str = "relu",
        init: str = "kaiming_uniform",
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout={dropout} is out of range; allowed: 0 <= dropout < 1")
        if not image_size >= 8:  # three 2x poolings: smaller images fail in the first forward pass
            raise ValueError(
                f"image_size={image_size} is too small; allowed: image_size >= 8 (data.image_size)"
            )
        widths = (in_channels, 32, 64, 128)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
            layers += [conv, nn.MaxPool2d(2), make_activation(activation, inplace=True)]
        self.features = nn.Sequential(*layers)
        flat = 128 * (image_size // 8) ** 2  # three 2x poolings: 32 → 4, so 128·4·4 = 2048
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 256),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )
        self.activation = activation
        init_weights(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, 3, H, W) → (B, classes)


def init_weights(model: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Initialise every conv/linear weight with ``scheme`` and zero the biases, as the course does.

    ``default`` keeps PyTorch's own initialisation (Kaiming-uniform with a=√5, and its uniform biases).
    """
    if scheme not in INITS:
        raise ValueError(f"model.init={scheme!r} is not one of {', '.join(INITS)}")
    if scheme == "default":
        return
    gain_name = _GAIN_NAMES[activation]
    nonlinearity = gain_name if gain_name in ("relu", "leaky_relu") else "linear"
    gain = nn.init.calculate_gain(gain_name, 0.01 if gain_name == "leaky_relu" else None)
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        w = module.weight
        if scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(
                w, a=0.01 if nonlinearity == "leaky_relu" else 0, nonlinearity=nonlinearity
            )
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(
                w, a=0.01 if nonlinearity == "leaky_relu" else 0, nonlinearity=nonlinearity
            )
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(w, gain=gain)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(w, gain=gain)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(w, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters so weight decay applies to weight matrices/kernels only, never to biases.

    With Adam this decay is L2 added to the gradient; with AdamW it is decoupled (the optimizer's own rule).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
