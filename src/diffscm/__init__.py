"""diffscm: counterfactual images with diffusion models (Diff-SCM) as a diffusers extension."""

from .models import (
    AntiCausalClassifier,
    AntiCausalClassifierOutput,
    AntiCausalPredictor,
    AntiCausalPredictorOutput,
    ExplainedClassifier,
    ParentEmbedding,
)
from .pipelines import DiffSCMPipeline, DiffSCMPipelineOutput
from .scm import CausalGraph, Mechanism, Node

__version__ = "0.1.0"
__all__ = [
    "AntiCausalClassifier",
    "AntiCausalClassifierOutput",
    "AntiCausalPredictor",
    "AntiCausalPredictorOutput",
    "CausalGraph",
    "DiffSCMPipeline",
    "DiffSCMPipelineOutput",
    "ExplainedClassifier",
    "Mechanism",
    "Node",
    "ParentEmbedding",
]
