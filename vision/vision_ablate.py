"""Discover the subnetwork of a trained image model that does a subtask (shape-only images, say):
python vision/vision_ablate.py CONFIG [--set key=value ...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("ablate")
