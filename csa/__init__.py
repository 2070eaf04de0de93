"""CSA: Contextual Similarity Aggregation with Self-attention for visual re-ranking."""

__version__ = "0.1.0"
