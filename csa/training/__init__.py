"""Training CSA: samples, engine, configuration, processes, random state, run folders, the entry point and
the torchrun launcher.

``python -m csa.training --help`` (also ``csa train``, and ``torchrun --nproc_per_node=N -m csa.training``).
"""
