"""Train a target network with representational alignment to a frozen guide: python guide.py CONFIG [...]."""

from instill.cli import entry

if __name__ == "__main__":
    entry("guide")
