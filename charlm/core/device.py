"""Choosing the device a command or stage runs on, from its `auto | cpu | cuda` setting."""

from __future__ import annotations

import torch

from charlm.base.errors import CharlmError


def pick_device(choice: str, key: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; `cuda` on a machine without it is an error naming `key`."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise CharlmError(f"{key} is 'cuda' but this machine has no usable CUDA device; set {key}: auto or cpu")
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
