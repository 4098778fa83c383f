"""Competition data: the folder contract, the decoded uint8 cache, and the embedded demo data."""
from src.data.dataset import CompetitionData, load_data  # noqa: F401
