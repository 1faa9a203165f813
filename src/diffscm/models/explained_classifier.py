"""A clean image classifier to explain, e.g. any 🤗 transformers `AutoModelForImageClassification`, as a
differentiable log p(class | x_0) on the pipeline's images.

Counterfactual explanations ("what would this input need to look like for the classifier to say 3?") guide the
intervention with grad log p(target | x0_hat(x_t)), where x0_hat is the DDIM estimate of the clean image from one UNet
pass, so a classifier trained on clean images only can guide a noisy chain (O(T) gradients, not DiME's nested
O(T^2) chain).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffscm.image_processing import random_affine

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


class ExplainedClassifier(nn.Module):
    """
    Wraps a classifier (`pixel_values` in, `.logits` out, `config.num_labels`) and its image processor's resizing
    and normalisation, applied differentiably to images in [-1, 1] `(B, C, H, W)`: grey is repeated for an RGB
    classifier and RGB turned grey (luma) for a grey one; `size`, `image_mean`, `image_std` come from the processor
    (a transformers image processor or a dict with those keys), or none for a classifier that takes [0, 1] images as
    they are. The guidance differentiates `robust_log_prob`, an average over `augmentations` random views.
    """

    def __init__(self, model: nn.Module, processor=None, augmentations: int = 4, noise: float = 0.2, seed: int = 0):
        super().__init__()
        if not isinstance(augmentations, int) or augmentations < 0:
            raise ValueError(f"`augmentations` must be an integer >= 0, got {augmentations!r}.")
        self.augmentations, self.noise = augmentations, noise
        self.generator = torch.Generator().manual_seed(seed)
        config = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or not isinstance(getattr(config, "num_labels", None), int):
            raise TypeError(
                "`classifier` must be an image classification model with `config.num_labels` whose forward takes "
                f"`pixel_values` and returns `.logits` (e.g. AutoModelForImageClassification); got {type(model)}."
            )
        self.model = model.eval().requires_grad_(False)
        settings = processor.to_dict() if hasattr(processor, "to_dict") else dict(processor or {})
        self.size = _size(settings) if settings.get("do_resize", True) else None
        normalize = settings.get("do_normalize", bool(settings.get("image_mean")))
        channels = getattr(config, "num_channels", 3)
        mean = settings.get("image_mean") if normalize else None
        std = settings.get("image_std") if normalize else None
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0] * channels).view(1, -1, 1, 1), persistent=False)
        self.channels = channels

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels

    def pixel_values(self, sample: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] as the classifier's processor would give them, differentiably, on its device."""
        images = (sample.to(self.mean.device).float() + 1) / 2
        if images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 3 and self.channels == 1:
            images = (images * torch.tensor(_LUMA, device=images.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.size is not None and tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return ((images - mean) / std).to(self.model.dtype)

    def log_prob(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | x) of images in [-1, 1], one per sample."""
        logits = self.model(pixel_values=self.pixel_values(sample)).logits.float()
        return logits.log_softmax(-1).gather(1, target.long().view(-1, 1)).squeeze(1)

    def robust_log_prob(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | x) averaged over `augmentations` random small rotations, shifts and scalings with Gaussian
        pixel noise (an expectation over transformations): what the guidance differentiates, so that it follows
        changes the classifier reads under any small transformation, the digit's shape, and not an adversarial
        pixel pattern of one view (measured on MNIST with the shipped ViT: the independent oracle agreed with 0.90
        of the flips with 4 views, 0.38 with none)."""
        if not self.augmentations:
            return self.log_prob(sample, target)
        total = 0
        for _ in range(self.augmentations):
            moved = random_affine(sample, degrees=10.0, translate=0.05, generator=self.generator)
            noise = torch.randn(sample.shape, generator=self.generator).to(sample)
            total = total + self.log_prob(moved + self.noise * noise, target)
        return total / self.augmentations

    def guidance_gradient(self, sample: torch.Tensor, eps: torch.Tensor, alpha: float, target) -> torch.Tensor:
        """The guidance gradient of this clean classifier at x_t (`sample`, which requires grad): grad_{x_t} log
        p(target | x0_hat(x_t)) over random views of the DDIM estimate x0_hat, weighted by sqrt(alpha_bar_t / (1 -
        alpha_bar_t)): the plain gradient explodes at high noise, where x0_hat divides by sqrt(alpha_bar_t) ~ 0.006
        (measured on MNIST: images destroyed, L1 > 100 grey levels at scale 2), and the signal-to-noise ratio itself
        leaves only adversarial detail changes near the end. A detached `eps` is held constant (one classifier
        backward pass); one computed from `sample` is differentiated as well (through the UNet)."""
        with torch.enable_grad():
            denoised = (sample - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
            gradient = torch.autograd.grad(self.robust_log_prob(denoised, target).sum(), sample)[0]
        return gradient.float() * math.sqrt(alpha / (1 - alpha))

    @torch.no_grad()
    def predict(self, sample: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.pixel_values(sample)).logits.argmax(-1)


def _size(settings: dict) -> tuple[int, int] | None:
    size = settings.get("size")
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict) and "height" in size:
        return (size["height"], size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return (size["shortest_edge"], size["shortest_edge"])
    return None
