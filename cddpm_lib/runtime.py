"""Device choice and seeding, shared by every stage."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def default_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other string is passed to ``torch.device``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
