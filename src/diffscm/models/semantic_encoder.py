"""Semantic abduction (Rasal et al., "Diffusion Counterfactual Generation with Semantic Abduction", ICML 2025).

DDIM inversion alone abducts the exogenous noise pixel by pixel, so the noise keeps whatever the factual parents put
in the pixels: a Colour-MNIST stroke is kept along the factual colour, and a prediction under another hue redraws
it. A semantic encoder reads the rest of the image, what the parents do not say, into a small latent z = e(x) that
conditions the noise model beside them: x = f(pa, z, u). Its KL term to N(0, I) makes z carry only what lowers the
noise model's loss beyond the parents, so z keeps the stroke's shape and not its colour.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class SemanticEncoder(ModelMixin, ConfigMixin):
    r"""
    The semantic part of the exogenous noise: a Gaussian posterior q(z | x) over a `latent_dim` vector, and its
    embedding, added to the UNet's class conditioning (the parent embedding).

    Abduction takes the posterior mean; a sample with no factual image takes z from the prior N(0, I). The embedding
    starts near zero, so a conditional UNet fine-tuned with a new encoder starts as nearly the same model, and the
    posterior's variance starts small, so that z carries the image from the first step; with a zero embedding the
    KL term alone would move the encoder (Adam scales any gradient up) and empty z first (posterior collapse).

    Parameters:
        in_channels (`int`): image channels.
        latent_dim (`int`): the size of z.
        embedding_dim (`int`): width of the UNet's timestep embedding (as the parent embedding's).
        block_out_channels (`tuple[int]`): channels of the stride-2 convolutions that read the image.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_dim: int = 16,
        embedding_dim: int = 128,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
    ):
        super().__init__()
        if latent_dim < 1 or not block_out_channels:
            raise ValueError(f"`latent_dim` must be >= 1 and `block_out_channels` non-empty, got {latent_dim}.")
        layers, channels = [], in_channels
        for width in block_out_channels:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU()]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.posterior = nn.Linear(16 * channels, 2 * latent_dim)
        nn.init.constant_(self.posterior.bias[latent_dim:], -6.0)  # z starts near its mean, so it can be read
        self.embedding = nn.Linear(latent_dim, embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.01)  # small, yet z's loss gradient is there from the first step
        nn.init.zeros_(self.embedding.bias)

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance `(B, latent_dim)` for images `(B, C, H, W)` in [-1, 1]."""
        mean, log_variance = self.posterior(self.features(sample.to(self.dtype))).chunk(2, dim=1)
        return mean, log_variance.clamp(-12, 6)

    def embed(self, latent: torch.Tensor) -> torch.Tensor:
        """z as the `(B, embedding_dim)` vector added to the parents' embedding."""
        return self.embedding(latent.to(self.dtype))

    @staticmethod
    def kl(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) in nats, one per image."""
        return 0.5 * (mean.square() + log_variance.exp() - log_variance - 1).sum(dim=1)
