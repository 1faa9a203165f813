"""diffscm: counterfactual images with diffusion models (Diff-SCM) as a diffusers extension.

The public names load lazily (PEP 562, as diffusers' `_LazyModule` does): `import diffscm.scm` needs no diffusers,
and `from diffscm import DiffSCMPipeline` imports the pipeline only then.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "AntiCausalClassifier": ".models",
    "AntiCausalClassifierOutput": ".models",
    "AntiCausalPredictor": ".models",
    "AntiCausalPredictorOutput": ".models",
    "ExplainedClassifier": ".models",
    "ParentEmbedding": ".models",
    "SemanticEncoder": ".models",
    "ParentColourMap": ".models",
    "DiffSCMPipeline": ".pipelines",
    "DiffSCMPipelineOutput": ".pipelines",
    "CausalGraph": ".scm",
    "Mechanism": ".scm",
    "Node": ".scm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
