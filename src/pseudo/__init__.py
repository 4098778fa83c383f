"""Learning from the unlabeled images: pseudo-labelers, selection rules, FixMatch-style
self-training and the precision-vs-coverage report (stage 02_pseudo)."""
