"""Discover the subnetwork that performs a subtask: python math/ablate.py CONFIG [--set key=value ...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("ablate")
