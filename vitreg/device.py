"""The torch device to compute on: the one place that turns a device name into a device."""

from __future__ import annotations

import torch

from vitreg.errors import OptionError


def choose_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:N]'; CUDA without a GPU is an
    OptionError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError("device", name, "CUDA is not available on this machine")
        return torch.device(name)
    raise OptionError("device", name, "expected auto, cpu or cuda")
