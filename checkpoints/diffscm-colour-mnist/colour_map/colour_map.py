"""The colour map's class for plain diffusers, from the installed diffscm (see ../pipeline_diffscm.py)."""

from diffscm.models.colour_map import ParentColourMap  # noqa: F401
