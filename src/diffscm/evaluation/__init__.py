"""Judges that score counterfactuals but never guide them, and the metrics built on them."""

from .judges import GraphJudges
from .oracle import DigitOracle
from .vae import DigitVAE, counterfactual_latent_divergence

__all__ = ["DigitOracle", "GraphJudges", "DigitVAE", "counterfactual_latent_divergence"]
