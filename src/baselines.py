"""Reference baselines a new user would try first, for comparison with the pipeline.

LabelSpreading (Zhou et al. 2004, scikit-learn, kNN kernel) on PCA-reduced raw pixels, seeded
with the same labeled images the pipeline uses.
"""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.semi_supervised import LabelSpreading

from src.data.dataset import CompetitionData


def label_spreading_pixels(data: CompetitionData, use_val: bool = True, n_components: int = 50,
                           n_neighbors: int = 7, seed: int = 0) -> np.ndarray:
    """Predicted class ids (0..C-1) for data.test_idx. `use_val=False` seeds with the train labels only."""
    x = np.asarray(data.images, dtype=np.float32).reshape(len(data.images), -1) / 255.0
    x = PCA(n_components=min(n_components, x.shape[1]), random_state=seed).fit_transform(x)
    y = data.class_ids.copy()
    if not use_val:
        y[(data.index["split"] == "val").to_numpy()] = -1
    model = LabelSpreading(kernel="knn", n_neighbors=n_neighbors, max_iter=100).fit(x, y)
    return model.transduction_[data.test_idx]
