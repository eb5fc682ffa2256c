"""torchslim: command-line model compression for PyTorch."""

__version__ = "0.1.0"
