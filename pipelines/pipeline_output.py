"""What DiffSCMPipeline returns and passes between its steps, as diffusers' `BaseOutput` dataclasses."""

from dataclasses import dataclass, field, replace

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class DiffSCMPipelineOutput(BaseOutput):
    """
    Args:
        images: counterfactuals, image-major: for `B` images and `K` targets each, image `b` under target `k` is at
            `b * K + k`. PIL images, a numpy array `(B*K, H, W, C)` or a tensor `(B*K, C, H, W)`, in [0, 1].
        counterfactual_values (`dict[str, np.ndarray]`): every variable of the causal graph after do() and
            propagation through the mechanisms, one value per counterfactual.
        factual_values (`dict[str, np.ndarray]`): the factual value of every variable, one per input image.
        predicted_factuals (`list[str]`): the factual values that were predicted from the image by the anti-causal
            predictor at t = 0 because they were not given.
        predicted_values (`dict[str, np.ndarray]`): the anti-causal predictor's estimate of each parent of the image
            from each counterfactual (a guide, not an independent judge); empty without a predictor.
        targets (`np.ndarray` of shape `(B*K,)`): with `target=`, the intervened class of each counterfactual.
        target_probabilities (`np.ndarray` of shape `(B*K,)`): with `target=`, p(target | counterfactual) by the
            anti-causal predictor at t = 0, or by the explained classifier.
        reconstructions: the null-intervention results, one per input image, when asked for.
        noise (`torch.Tensor`): the abducted exogenous noise u, one per input image, when asked for.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    counterfactual_values: dict[str, np.ndarray]
    factual_values: dict[str, np.ndarray]
    predicted_factuals: list[str]
    predicted_values: dict[str, np.ndarray]
    targets: np.ndarray | None = None
    target_probabilities: np.ndarray | None = None
    reconstructions: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    noise: torch.Tensor | None = None


@dataclass(frozen=True)
class Chain:
    """
    The DDIM chain of one abduction and its prediction, checked and built once by
    [`DiffSCMPipeline.get_chain`]; it reads as its list of steps.

    Args:
        num_inference_steps (`int`), strength (`float`): what it was built from.
        steps: `(t, alpha_bar_t, alpha_bar_next)` of each generation step, t descending.
    """

    num_inference_steps: int
    strength: float
    steps: tuple[tuple[int, float, float], ...]

    @property
    def alphas(self) -> list[float]:
        """alpha_bar of every state, from the noise (index 0) to the clean sample (index len(chain))."""
        return [alpha for _, alpha, _ in self.steps] + [self.steps[-1][2]]

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, index):
        return self.steps[index]


@dataclass
class Abduction(BaseOutput):
    """
    The result of abduction: the exogenous noise of each factual image and what it was abducted under. [`intervene`]
    follows these settings, so the prediction runs the very chain that the inversion ran.

    Args:
        noise (`torch.Tensor` `(B, C, H, W)`, float64 but on MPS): u, at the intervention's first timestep.
        factual_values (`dict[str, np.ndarray]`): the factual value of each parent of the image, one per sample.
        num_inference_steps (`int`), strength (`float`), abduction_refinement_steps (`int`): the DDIM chain.
        cfg_scale (`dict[str, float]`): the classifier-free guidance scale of each parent (conditional mechanism).
        chain (`Chain`): the chain itself, which the prediction walks down (None: built from the settings above).
        integrator (`str`): "ddim", "bdia" or "residual"; previous (`torch.Tensor`): BDIA's abducted state one step
            below u, from which the prediction continues (None otherwise).
        residuals (`torch.Tensor` `(B, steps, C, H, W)`): the residual integrator's abducted gap of each step, the
            abducted state below minus the DDIM step down to it, which the prediction adds back (None otherwise).
        semantic_latent (`torch.Tensor` `(B, latent_dim)`): semantic abduction's z = e(x) (None without an encoder).
    """

    noise: torch.Tensor
    factual_values: dict[str, np.ndarray]
    num_inference_steps: int
    strength: float
    abduction_refinement_steps: int
    cfg_scale: dict[str, float]
    chain: Chain | None = None
    integrator: str = "ddim"
    previous: torch.Tensor | None = None
    residuals: torch.Tensor | None = None
    semantic_latent: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.noise.shape[0]

    def repeat_interleave(self, repeats: int) -> "Abduction":
        """Every sample repeated `repeats` times in a row, for several interventions from one abduction."""
        values = {name: np.repeat(value, repeats) for name, value in self.factual_values.items()}
        tensors = {
            name: None if tensor is None else tensor.repeat_interleave(repeats, dim=0)
            for name, tensor in (
                ("noise", self.noise),
                ("previous", self.previous),
                ("residuals", self.residuals),
                ("semantic_latent", self.semantic_latent),
            )
        }
        return replace(self, factual_values=values, **tensors)


@dataclass
class Guidance:
    """What steers one prediction, prepared from checked values by [`DiffSCMPipeline.prepare_guidance`].

    Args:
        cfg_scale: classifier-free guidance scale w of each parent (the abduction's), part of the noise estimate.
        guides: [`~pipelines.guides.Guide`]s whose gradients steer each step (the anti-causal predictor, an explained
            classifier, a user's own).
        changed: 1 for each sample whose parents change, else 0 (None: none changes).
    """

    cfg_scale: dict[str, float]
    guides: list = field(default_factory=list)
    changed: torch.Tensor | None = None

    @property
    def any_changed(self) -> bool:
        return self.changed is not None and bool(self.changed.any())
