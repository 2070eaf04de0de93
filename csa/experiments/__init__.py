"""Experiments on the demo, built from the wings below: recipe selection, seed sweeps and learning curves, the
retrained-versus-released comparison, and the paper's table (cross-city and pooled protocols, whitening).

``csa demo select | seeds | curve | release`` run them from the command line (:mod:`csa.experiments.command`).
"""
