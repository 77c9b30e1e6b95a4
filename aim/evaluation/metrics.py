"""Metrics on predictions (class indices), shared by the clean PyTorch evaluation and the sweeps."""

from __future__ import annotations

import numpy as np


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted == labels))


def agreement(predicted: np.ndarray, clean: np.ndarray) -> float:
    """Fraction of rows / pixels / positions whose prediction is the clean model's."""
    return float(np.mean(predicted == clean))


def confusion(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    index = labels.reshape(-1) * num_classes + predicted.reshape(-1)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over classes present in labels or predictions of |P & L| / |P | L|."""
    matrix = confusion(predicted, labels, num_classes)
    inter = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - inter
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


def class_recall(predicted: np.ndarray, labels: np.ndarray, cls: int) -> float:
    """Fraction of the pixels / samples labelled `cls` that are predicted `cls`."""
    mask = labels == cls
    return float(np.mean(predicted[mask] == cls)) if mask.any() else float("nan")
