"""Transplant an image model's subnetwork into fresh models, train them, and measure shape bias:
python vision/vision_transfer.py CONFIG [--set key=value ...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("transfer")
