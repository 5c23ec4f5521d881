"""Kept for one release: ``from imgclf.api import ImageClassifier`` still works.

New code imports :class:`imgclf.train.classifier.ImageClassifier` (training) or
:class:`imgclf.model.classifier.Classifier` (a loaded model).
"""

from imgclf.data.datasets import labelled_eval_samples, with_validation_folder
from imgclf.model.classifier import Classifier
from imgclf.runs.environment import environment_info
from imgclf.train.classifier import ImageClassifier

__all__ = ["Classifier", "ImageClassifier", "environment_info", "labelled_eval_samples", "with_validation_folder"]
