"""Multinomial logistic regression on embeddings (scikit-learn): the plain baseline."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from src.heads import HEADS, Head
from src.transductive import l2_normalize


@HEADS.register("logreg")
class LogReg(Head):
    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        x, y, w = self._start(support_x, support_y, n_classes, support_weight)
        self.classes_ = np.flatnonzero(self.present)
        self.model = None
        if len(self.classes_) > 1:  # sklearn needs two classes; one class -> certain prediction
            # Balanced class weights: leave-one-out leaves the held-out image's class one short, and an
            # intercept fit to those counts would vote against exactly that class.
            self.model = LogisticRegression(C=self.cfg.logreg_c, max_iter=1000, class_weight="balanced")
            self.model.fit(l2_normalize(x), y, sample_weight=w)
        return self

    def predict_proba(self, x):
        out = np.zeros((len(x), self.n_classes), np.float32)
        if self.model is None:
            out[:, self.classes_] = 1.0
        else:
            out[:, self.model.classes_] = self.model.predict_proba(l2_normalize(x))
        return out
