from .anticausal import (
    AntiCausalClassifier,
    AntiCausalClassifierOutput,
    AntiCausalPredictor,
    AntiCausalPredictorOutput,
)
from .parent_embedding import ParentEmbedding

__all__ = [
    "AntiCausalClassifier",
    "AntiCausalClassifierOutput",
    "AntiCausalPredictor",
    "AntiCausalPredictorOutput",
    "ParentEmbedding",
]
