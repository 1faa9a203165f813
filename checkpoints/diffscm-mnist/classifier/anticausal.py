"""The anti-causal predictor's class for plain diffusers, from the installed diffscm (see ../pipeline_diffscm.py)."""

from diffscm.models.anticausal import AntiCausalClassifier  # noqa: F401
