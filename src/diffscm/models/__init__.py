from .anticausal import (
    AntiCausalClassifier,
    AntiCausalClassifierOutput,
    AntiCausalPredictor,
    AntiCausalPredictorOutput,
)
from .colour_map import ParentColourMap
from .explained_classifier import ExplainedClassifier
from .parent_embedding import ParentEmbedding
from .semantic_encoder import SemanticEncoder

__all__ = [
    "AntiCausalClassifier",
    "AntiCausalClassifierOutput",
    "AntiCausalPredictor",
    "AntiCausalPredictorOutput",
    "ExplainedClassifier",
    "ParentColourMap",
    "ParentEmbedding",
    "SemanticEncoder",
]
