"""Independent judges for any causal graph: one clean-image predictor per parent of the image."""

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .oracle import DigitOracle


class GraphJudges(ModelMixin, ConfigMixin):
    r"""
    A predictor of every parent of the image from the clean image: the VGG-style network of [`DigitOracle`] with one
    output block per parent (class logits for a categorical parent, the value scaled to its range for a continuous
    one). It differs from the pipeline's anti-causal predictor in architecture (no timestep input, no conditioning),
    training view (clean images) and seed, so guidance cannot game it; it judges, never guides.

    Parameters:
        parents (`dict`): per parent, `{"type": "categorical", "num_classes": K}` or
            `{"type": "continuous", "range": [low, high]}` (`CausalGraph.parent_specs()`).
        sample_size (`int`), in_channels (`int`): the images.
        channels (`tuple[int]`), dropout (`float`): the network's (see [`DigitOracle`]).
    """

    @register_to_config
    def __init__(
        self,
        parents: dict,
        sample_size: int = 28,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64, 128),
        dropout: float = 0.3,
    ):
        super().__init__()
        outputs = sum(spec["num_classes"] if spec["type"] == "categorical" else 1 for spec in parents.values())
        self.network = DigitOracle(sample_size, in_channels, outputs, tuple(channels), dropout)

    def forward(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per parent, the logits `(B, K)` or the scaled value `(B,)` of images in [-1, 1]."""
        outputs, start = {}, 0
        flat = self.network(sample)
        for name, spec in self.config.parents.items():
            width = spec["num_classes"] if spec["type"] == "categorical" else 1
            block = flat[:, start : start + width]
            outputs[name] = block if width > 1 or spec["type"] == "categorical" else block[:, 0]
            start += width
        return outputs

    def loss(self, outputs: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per categorical parent plus the squared error of each continuous one (on its scaled
        range, so every parent weighs alike)."""
        total = 0.0
        for name, spec in self.config.parents.items():
            if spec["type"] == "categorical":
                total = total + F.cross_entropy(outputs[name].float(), values[name].long())
            else:
                total = total + F.mse_loss(outputs[name].float(), self._scale(name, values[name].float()))
        return total

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> dict[str, np.ndarray]:
        """Every parent's value read from images `(B, C, H, W)` in [0, 1]: class indices or values in their
        units."""
        readings = {name: [] for name in self.config.parents}
        for start in range(0, len(images), batch_size):
            outputs = self(images[start : start + batch_size].to(self.device, self.dtype) * 2 - 1)
            for name, spec in self.config.parents.items():
                value = (
                    outputs[name].argmax(-1) if spec["type"] == "categorical" else self._unscale(name, outputs[name])
                )
                readings[name].append(value.float().cpu())
        return {name: torch.cat(parts).numpy() for name, parts in readings.items()}

    def embed(self, sample: torch.Tensor) -> torch.Tensor:
        """The pooled last-stage features: the space in which realism (Frechet distance, KID) is measured."""
        return self.network.embed(sample)

    def _scale(self, name: str, value: torch.Tensor) -> torch.Tensor:
        low, high = self.config.parents[name]["range"]
        return (value - low) / (high - low)

    def _unscale(self, name: str, value: torch.Tensor) -> torch.Tensor:
        low, high = self.config.parents[name]["range"]
        return value.float() * (high - low) + low


def judge_errors(reading: dict[str, np.ndarray], expected: dict, parents: dict) -> dict[str, float]:
    """Per parent: accuracy (categorical) or mean absolute error (continuous) of a reading against the values."""
    errors = {}
    for name, spec in parents.items():
        truth = np.asarray(expected[name], np.float64)
        if spec["type"] == "categorical":
            errors[f"{name}_accuracy"] = float((reading[name] == truth).mean())
        else:
            errors[f"{name}_mae"] = float(np.abs(reading[name] - truth).mean())
    return errors
