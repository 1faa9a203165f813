"""The parent embedding's class for plain diffusers, from the installed diffscm (see ../pipeline_diffscm.py)."""

from diffscm.models.parent_embedding import ParentEmbedding  # noqa: F401
