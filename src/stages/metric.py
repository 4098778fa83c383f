"""Stage 03: metric learning (triplet / ArcFace / contrastive / multi-similarity / any
pytorch-metric-learning loss) from the latest encoder on labeled + selected pseudo-labeled images."""
from src.metric.train import train, validate
from src.stages import Stage

STAGE = Stage(key="metric", title="metric learning on labeled + pseudo-labeled images", sections=("data", "metric"),
              run=train, after=("ssl",), optional_after=("pseudo",), validate=validate)
