"""The Hugging Face Space entry point: the diffscm web demo (`diffscm serve` runs the same app on localhost)."""

from diffscm.cli.serve import build_app, launch

launch(build_app())
