"""diffscm: counterfactual images with diffusion models (Diff-SCM) as a diffusers extension."""

from .models import AntiCausalClassifier, AntiCausalClassifierOutput
from .pipelines import DiffSCMPipeline, DiffSCMPipelineOutput

__version__ = "0.1.0"
__all__ = ["AntiCausalClassifier", "AntiCausalClassifierOutput", "DiffSCMPipeline", "DiffSCMPipelineOutput"]
