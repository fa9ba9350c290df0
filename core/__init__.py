"""instill: give neural networks inductive biases they cannot learn on their own."""

__version__ = "0.1.0"
