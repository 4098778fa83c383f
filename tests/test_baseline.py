import numpy as np
import pandas as pd

from src.baselines import label_spreading_pixels
from src.data.dataset import CompetitionData


def test_label_spreading_on_separable_pixels():
    """Two flat-colour classes: label spreading from one seed each must label every image right."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    images = np.where(y[:, None, None, None] == 0, 40, 210) + rng.integers(-10, 10, (80, 8, 8, 3))
    labels = np.full(80, -1)
    labels[[0, 40]] = [0, 1]
    split = np.array(["test"] * 80, dtype=object)
    split[[0, 40]] = "train"
    data = CompetitionData(images=images.astype(np.uint8),
                           index=pd.DataFrame({"image_id": [f"i{k}" for k in range(80)], "split": split, "label": labels}))
    pred = label_spreading_pixels(data, n_components=5)
    assert (pred == y[data.test_idx]).all()
