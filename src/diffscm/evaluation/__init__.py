"""Judges that score counterfactuals but never guide them, and the metrics built on them."""

from .oracle import DigitOracle, random_affine

__all__ = ["DigitOracle", "random_affine"]
