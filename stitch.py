"""Stitch two networks at chosen layers with a trained transform: python stitch.py CONFIG [...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("stitch")
