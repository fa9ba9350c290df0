"""Transplant a subnetwork into fresh models and train: python math/transfer.py CONFIG [--set key=value ...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("transfer")
