"""Few-shot image classification toolkit: every stage's logic lives in this package.

Stage scripts in ``pipelines/`` are thin wrappers around ``src.stages``.
"""
