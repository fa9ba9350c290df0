"""Backprop-free learning rules against back-propagation, and input-weight alignment scores:
python align.py CONFIG [...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("align")
