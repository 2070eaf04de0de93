"""Other re-rankers and the comparison runner: αQE/AQE, DBA/αDBA, diffusion, k-reciprocal, the untrained
affinity baseline, chains of them, the published numbers and :func:`~csa.compare.runner.run_comparison`."""
