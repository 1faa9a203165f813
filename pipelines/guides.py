"""Guides: what steers a prediction step towards the counterfactual parents besides the noise model itself.

A guide is any object with `gradient(sample, timestep, alpha, values, eps)`: the gradient at x_t of the log-likelihood
it raises, scaled per sample, which the step subtracts from the noise estimate `eps` times sqrt(1 - alpha_bar_t)
(Dhariwal & Nichol 2021, eq. 14). `values`: the counterfactual value of every parent of the image, one per sample.
A guide whose `needs_noise_gradient` is true gets a `sample` that requires grad and the `eps` computed from it, to
differentiate through the noise model. Classifier-free guidance is not a guide: it is part of the noise estimate.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from diffscm.models.anticausal import AntiCausalClassifier, AntiCausalPredictor
from diffscm.models.explained_classifier import ExplainedClassifier


class Guide(Protocol):
    needs_noise_gradient: bool = False

    def gradient(
        self, sample: torch.Tensor, timestep: int, alpha: float, values: dict[str, torch.Tensor], eps: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class AntiCausalGuide:
    """The paper's guidance: grad_{x_t} sum_k s_k log p_phi(pa_k = values[k] | x_t, t) of the noise-aware anti-causal
    predictor, with a scale per parent and sample (zero for samples left unchanged); the gradient flows through the
    predictor only."""

    predictor: AntiCausalClassifier | AntiCausalPredictor
    scales: dict[str, torch.Tensor]

    def gradient(self, sample, timestep, alpha, values, eps):
        with torch.enable_grad():
            sample = sample.detach().to(self.predictor.dtype).requires_grad_(True)
            log_likelihoods = self.predictor.log_likelihood(sample, timestep, values)
            total = sum((s.to(sample.device) * log_likelihoods[name]).sum() for name, s in self.scales.items())
            return torch.autograd.grad(total, sample)[0].float()


@dataclass
class ExplainedClassifierGuide:
    """A clean image classifier explained by counterfactuals: the gradient of log p(class | x0_hat(x_t)) towards the
    categorical `parent`'s counterfactual class ([`ExplainedClassifier.guidance_gradient`]), `scale` per sample.
    `kind` "cheap" holds x0_hat's noise estimate constant; "full" differentiates the noise model as well."""

    explained: ExplainedClassifier
    parent: str
    scale: torch.Tensor
    kind: str

    @property
    def needs_noise_gradient(self) -> bool:
        return self.kind == "full"

    def gradient(self, sample, timestep, alpha, values, eps):
        if not self.needs_noise_gradient:
            sample, eps = sample.detach().requires_grad_(True), eps.detach()
        gradient = self.explained.guidance_gradient(sample, eps, alpha, values[self.parent])
        return self.scale.view(-1, 1, 1, 1) * gradient


def check_guides(guides) -> list:
    """`guides=`: None, or a list of objects with a `gradient(sample, timestep, alpha, values, eps)` method."""
    if guides is None:
        return []
    if not isinstance(guides, list | tuple) or not all(callable(getattr(g, "gradient", None)) for g in guides):
        raise TypeError(
            f"`guides` takes a list of guides, objects with a gradient(sample, timestep, alpha, values, eps) method; "
            f"got {guides!r}."
        )
    return list(guides)
