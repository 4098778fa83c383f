"""Self-supervised encoder pretraining (stage 01_ssl): objectives, view sources, trainer."""
