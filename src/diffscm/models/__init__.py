from .anticausal import AntiCausalClassifier, AntiCausalClassifierOutput

__all__ = ["AntiCausalClassifier", "AntiCausalClassifierOutput"]
