"""Train a base model on an image dataset: python vision/vision_base.py CONFIG [--set key=value ...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("base")
