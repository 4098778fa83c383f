"""Stage 01: self-supervised encoder pretraining on every image (labels ignored)."""
from src.ssl.trainer import lr_find, train, validate
from src.stages import Stage

STAGE = Stage(key="ssl", title="self-supervised encoder pretraining", sections=("backbone", "ssl"), run=train,
              after=("prepare",), lr_find=lr_find, validate=validate)
