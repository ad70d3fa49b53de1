"""The privacy transform applied on rank 0 to exactly the activations Z that leave it."""

from __future__ import annotations

import torch

__all__ = ["Privacy", "make_privacy", "MECHANISMS"]

MECHANISMS = ("none",)


class Privacy:
    """``privacy=none``: Z leaves rank 0 unchanged (the exactness baseline)."""

    mechanism = "none"

    def apply(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Transform Z (B, T, H) before it is sent; ``mask`` (B, T) marks real tokens."""
        return z

    def attrs(self) -> dict:
        """Root attributes recorded in the results file."""
        return {"privacy_mechanism": self.mechanism}


def make_privacy(mechanism: str) -> Privacy:
    if mechanism not in MECHANISMS:
        raise ValueError(f"privacy.mechanism={mechanism!r} is not one of {MECHANISMS}")
    return Privacy()
