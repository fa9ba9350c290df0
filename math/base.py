"""Train a base model on a symbolic task: python math/base.py CONFIG [--set key=value ...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("base")
