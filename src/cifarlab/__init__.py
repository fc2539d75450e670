"""cifarlab: train and tune the course CIFAR CNN."""

__version__ = "0.1.0"
