"""`python -m csa ...` is the same as the `csa` console script."""

from csa.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
