"""DiffSCMPipeline for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, from the installed diffscm
(`pip install -e .` in the repository). `diffscm.hub.push_to_hub` uploads the pipeline's own code instead."""

from diffscm import DiffSCMPipeline  # noqa: F401
