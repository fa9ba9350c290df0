"""Layer-by-layer similarity of two trained networks on one dataset: python compare.py CONFIG [...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("compare")
