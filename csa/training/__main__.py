"""``python -m csa.training`` / ``torchrun -m csa.training``: the training entry point."""
import sys

from csa.training.train import main

if __name__ == "__main__":
    sys.exit(main())
