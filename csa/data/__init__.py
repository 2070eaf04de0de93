"""Data on disk: the layouts of ground truth and descriptors, the embedded demo, downloads, R1M distractors."""
