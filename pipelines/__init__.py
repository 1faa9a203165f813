from .pipeline_diffscm import DiffSCMPipeline, DiffSCMPipelineOutput

__all__ = ["DiffSCMPipeline", "DiffSCMPipelineOutput"]
