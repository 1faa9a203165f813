"""The anti-causal predictor's class for plain diffusers, from the installed diffscm (see ../pipeline_diffscm.py)."""

from diffscm.models.anticausal import AntiCausalPredictor  # noqa: F401
