"""Scoring a trained model: the `score` command's engine and `Scorer`, prediction files, and the torchmetrics
metric on image tensors."""

FORMATS = (".csv", ".jsonl", ".parquet")
"""Formats of score and prediction files, chosen by the file's extension (here, where the command line reads them
without importing torch)."""
