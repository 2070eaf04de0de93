"""``python -m csa.training ...`` / ``torchrun -m csa.training ...``: the same command as ``csa train ...``."""
import sys

from csa.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
