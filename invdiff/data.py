"""Data that ships inside packages: the 8x8 digits of scikit-learn, with a fixed held-out split.

Images are returned in ``[0, 1]``, shape ``(N, 1, 8, 8)``, float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIGITS_SPLIT", "digits"]

#: how the digits are split: a permutation drawn with this seed; the first ``test_size`` are held out
DIGITS_SPLIT = {"seed": 0, "test_size": 300}


def digits(split: str) -> Tensor:
    """The ``train`` (1497 images) or ``test`` (300 held-out images) part of ``load_digits``."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    images = load_digits().images / 16.0
    order = np.random.default_rng(DIGITS_SPLIT["seed"]).permutation(len(images))
    test_size = DIGITS_SPLIT["test_size"]
    chosen = order[:test_size] if split == "test" else order[test_size:]
    return torch.from_numpy(images[chosen]).to(torch.float64)[:, None]
