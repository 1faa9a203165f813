"""A small VAE whose posteriors measure minimality (CLD); trained by the project, never used to guide."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence


@dataclass
class DigitVAEOutput(BaseOutput):
    """
    Args:
        reconstruction (`torch.Tensor`): the decoded sample of the posterior, in [-1, 1].
        mean, log_variance (`torch.Tensor` of shape `(B, latent_dim)`): the diagonal Gaussian posterior q(z | x).
    """

    reconstruction: torch.Tensor
    mean: torch.Tensor
    log_variance: torch.Tensor


class DigitVAE(ModelMixin, ConfigMixin):
    r"""
    Convolutional VAE for small grey images (two stride-2 stages each way) with a diagonal Gaussian posterior.

    Parameters:
        sample_size (`int`): input height and width (divisible by 4).
        in_channels (`int`): image channels.
        channels (`tuple[int, int]`): channels of the two encoder stages (mirrored by the decoder).
        latent_dim (`int`): dimension of z.
    """

    @register_to_config
    def __init__(self, sample_size: int = 28, in_channels: int = 1, channels: tuple = (32, 64), latent_dim: int = 16):
        super().__init__()
        if sample_size % 4:
            raise ValueError(f"`sample_size` must be divisible by 4, got {sample_size}.")
        first, second = channels
        self.bottom = sample_size // 4
        flat = second * self.bottom * self.bottom
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, first, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(first, second, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        self.to_posterior = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(second, first, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(first, in_channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )

    def encode(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x) for images in [-1, 1]."""
        mean, log_variance = self.to_posterior(self.encoder(sample)).chunk(2, dim=1)
        return mean, log_variance.clamp(-10, 10)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        hidden = self.from_latent(latent).view(len(latent), -1, self.bottom, self.bottom)
        return self.decoder(hidden)

    def forward(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> DigitVAEOutput:
        mean, log_variance = self.encode(sample)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return DigitVAEOutput(self.decode(mean + (0.5 * log_variance).exp() * noise), mean, log_variance)


def vae_loss(output: DigitVAEOutput, sample: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Negative ELBO per image: squared reconstruction error plus beta * KL(q(z | x) || N(0, I))."""
    reconstruction = F.mse_loss(output.reconstruction, sample, reduction="none").flatten(1).sum(1)
    standard = torch.zeros_like(output.mean)
    kl = gaussian_kl(output.mean, output.log_variance, standard, standard)
    return (reconstruction + beta * kl).mean()


def gaussian_kl(mean_p, log_var_p, mean_q, log_var_q) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians, row by row (broadcasting)."""
    return kl_divergence(diagonal_gaussian(mean_p, log_var_p), diagonal_gaussian(mean_q, log_var_q))


def diagonal_gaussian(mean: torch.Tensor, log_var: torch.Tensor) -> Independent:
    """N(mean, diag(exp(log_var))) over the last dimension."""
    return Independent(Normal(mean, (0.5 * log_var).exp()), 1)


@torch.no_grad()
def counterfactual_latent_divergence(
    vae: DigitVAE, factuals, counterfactuals, labels, targets, reference, reference_labels, weights=(1.0, 1.0)
) -> torch.Tensor:
    """
    CLD (Sanchez & Tsaftaris 2022) per counterfactual, lower is better: with div = KL(q(z|x_f) || q(z|x_cf)) and S_f,
    S_cf the divergences from x_f to real images of the factual and the target class,
    CLD = log(w1 * exp(P(S_cf <= div)) + w2 * exp(P(S_f >= div))). Images in [0, 1].
    """
    factual_post = vae.encode(factuals * 2 - 1)
    counterfactual_post = vae.encode(counterfactuals * 2 - 1)
    reference_mean, reference_log_var = vae.encode(reference * 2 - 1)
    divergence = gaussian_kl(*factual_post, *counterfactual_post)
    to_reference = gaussian_kl(factual_post[0][:, None], factual_post[1][:, None], reference_mean, reference_log_var)
    same_class = reference_labels[None] == labels[:, None]
    target_class = reference_labels[None] == targets[:, None]
    below = ((to_reference <= divergence[:, None]) & target_class).sum(1) / target_class.sum(1).clamp(min=1)
    above = ((to_reference >= divergence[:, None]) & same_class).sum(1) / same_class.sum(1).clamp(min=1)
    return torch.log(weights[0] * below.exp() + weights[1] * above.exp())
