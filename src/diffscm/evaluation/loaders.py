"""The judges and explained classifiers that the commands load from folders."""

import os

from ..paths import shipped_checkpoint
from .vae import DigitVAE


def load_explained_classifier(folder: str):
    """A transformers image classifier folder (model and image processor) as an `ExplainedClassifier`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from ..models import ExplainedClassifier

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--classifier {folder!r} is not a folder.")
    try:
        model = AutoModelForImageClassification.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--classifier {folder!r} is not a transformers image classifier: {error}") from error
    return ExplainedClassifier(model, processor)


def load_vae(path: str | None, pipe):
    """The VAE for CLD: `--vae`, else the shipped MNIST one when it fits the model's images, else none (no CLD)."""
    explicit = path is not None
    if not explicit:
        try:
            path = shipped_checkpoint("mnist-vae")
        except FileNotFoundError:
            return None
    vae = DigitVAE.from_pretrained(path).eval().to(pipe.device)
    fits = all(vae.config[key] == pipe.unet.config[key] for key in ("sample_size", "in_channels"))
    if not fits and explicit:
        raise ValueError(f"The VAE {path} takes other images than the model ({vae.config.sample_size} px).")
    return vae if fits else None
