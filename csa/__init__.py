"""CSA: Contextual Similarity Aggregation with Self-attention for visual re-ranking (NeurIPS 2021).

The top level is the paper: :mod:`csa.model` (the transformer), :mod:`csa.losses`, :mod:`csa.affinity`
(the affinity features), :mod:`csa.search` (first stage), :mod:`csa.rerank`, :mod:`csa.evaluate`
(Revisited Oxford/Paris) and :mod:`csa.largescale` (+1M distractors), :mod:`csa.stats` and
:mod:`csa.checkpoint`.  The wings are sub-packages: :mod:`csa.data`, :mod:`csa.descriptors`,
:mod:`csa.training`, :mod:`csa.compare`, :mod:`csa.experiments` and :mod:`csa.notebook`; :mod:`csa.cli` is
the one command line over them.
"""

__version__ = "0.1.0"

from csa.checkpoint import load_model
from csa.data.layout import load_gnd, load_test_features
from csa.evaluate import evaluate_revisited, print_revisited
from csa.model import RerankTransformer
from csa.rerank import rerank
from csa.search import first_stage

__all__ = ["RerankTransformer", "evaluate_revisited", "first_stage", "load_gnd", "load_model", "load_test_features",
           "print_revisited", "rerank", "__version__"]
