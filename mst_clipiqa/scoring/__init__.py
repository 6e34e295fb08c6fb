"""Scoring a trained model: the `score` command's engine and `Scorer`, prediction files, and the torchmetrics
metric on image tensors."""
