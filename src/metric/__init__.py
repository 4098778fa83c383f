"""Metric learning (stage 03_metric): triplet / ArcFace / contrastive / multi-similarity and any other
pytorch-metric-learning loss, on labeled + pseudo-labeled images."""
