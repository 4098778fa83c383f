"""Stage 00: validate the competition data and decode it once into a uint8 cache."""
from src.data.prepare import prepare
from src.stages import Stage

STAGE = Stage(key="prepare", title="prepare data: validate, decode, cache", sections=("data", "dedup"), run=prepare)
