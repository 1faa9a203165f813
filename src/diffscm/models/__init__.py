from .anticausal import (
    AntiCausalClassifier,
    AntiCausalClassifierOutput,
    AntiCausalPredictor,
    AntiCausalPredictorOutput,
)

__all__ = ["AntiCausalClassifier", "AntiCausalClassifierOutput", "AntiCausalPredictor", "AntiCausalPredictorOutput"]
