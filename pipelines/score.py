"""Score a submission: python pipelines/score.py SUBMISSION.csv TRUTH.csv

Prints accuracy, per-class accuracy and the confusion matrix over the ids of the truth file."""
import argparse

import _bootstrap  # noqa: F401

from src.cli import guarded
from src.submission import format_score, score

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("submission")
    parser.add_argument("truth")
    args = parser.parse_args()
    guarded(lambda: print(format_score(score(args.submission, args.truth))))
