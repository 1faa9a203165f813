"""An independent oracle classifier on clean images: it judges counterfactuals and is never used to guide them."""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DigitOracle(ModelMixin, ConfigMixin):
    r"""
    A plain VGG-style CNN p(y | x_0) on clean images in [-1, 1]: batch-normalised 3x3 convolutions, max pooling and a
    dropout MLP head. Different in architecture, training data view (clean, augmented) and seed from the anti-causal
    predictor that guides the pipeline, so that guidance cannot game the judge.

    Parameters:
        sample_size (`int`): input height and width.
        in_channels (`int`): image channels.
        num_classes (`int`): classes to predict.
        channels (`tuple[int]`): channels of the convolution stages; each stage halves the resolution.
        dropout (`float`): dropout before and inside the head.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 64, 128),
        dropout: float = 0.3,
    ):
        super().__init__()
        layers, previous = [], in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(previous, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """Logits of p(y | x_0) for images in [-1, 1]."""
        return self.head(F.adaptive_avg_pool2d(self.features(sample), 1))

    def stage_features(self, sample: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after each convolution stage (for perceptual distances and embeddings)."""
        maps = []
        for layer in self.features:
            sample = layer(sample)
            if isinstance(layer, nn.MaxPool2d):
                maps.append(sample)
        return maps

    def embed(self, sample: torch.Tensor) -> torch.Tensor:
        """The pooled last-stage features: the space in which realism (Frechet distance, KID) is measured."""
        return F.adaptive_avg_pool2d(self.features(sample), 1).flatten(1)
