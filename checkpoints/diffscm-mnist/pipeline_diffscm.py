"""Diff-SCM (Sanchez & Tsaftaris, CLeaR 2022): counterfactual images by DDIM abduction and guided intervention."""

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from .image_processing import PipelineImageInput, preprocess_images
from .anticausal import AntiCausalClassifier

TargetInput = int | str | list | np.ndarray | torch.Tensor


@dataclass
class DiffSCMPipelineOutput(BaseOutput):
    """
    Args:
        images: counterfactuals, image-major: for `B` images and `K` targets each, image `b` under target `k` is at
            `b * K + k`. PIL images, a numpy array `(B*K, H, W, C)` or a tensor `(B*K, C, H, W)`, in [0, 1].
        targets (`np.ndarray` of shape `(B*K,)`): the intervened value of each counterfactual.
        target_probabilities (`np.ndarray` of shape `(B*K,)`): p_phi(target | counterfactual, t=0), the anti-causal
            predictor's belief that the intervention took effect (a guide, not an independent judge).
        reconstructions: the null-intervention (guidance 0) results, one per input image, when asked for.
        noise (`torch.Tensor`): the abducted exogenous noise u, one per input image, when asked for.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    targets: np.ndarray
    target_probabilities: np.ndarray
    reconstructions: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    noise: torch.Tensor | None = None


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM move from alpha-bar `alpha_from` to `alpha_to`; its own inverse when the two are swapped."""
    pred_original = (sample - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * pred_original + math.sqrt(1 - alpha_to) * eps


class DiffSCMPipeline(DiffusionPipeline):
    r"""
    Counterfactual image generation with a diffusion model as the image's causal mechanism (Diff-SCM).

    1. Abduction: deterministic DDIM inversion of the factual image x_0 to its exogenous noise u = x_T.
    2. Intervention and prediction: DDIM from u back to x_0, guided by the anti-causal predictor p_phi(y | x_t, t)
       towards the intervened value y* of the image's parent:
       eps_hat = eps_theta(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_{x_t} log p_phi(y* | x_t, t).

    Parameters:
        unet ([`UNet2DModel`]): the noise model eps_theta (epsilon prediction).
        scheduler ([`DDIMScheduler`]): its noise schedule; any scheduler config is read as a DDIM one.
        classifier ([`AntiCausalClassifier`]): the noise-aware anti-causal predictor, trained on the same schedule.
        guidance_scale (`float`): default guidance scale s, chosen by measurement for the shipped checkpoints.
        num_inference_steps (`int`): default number of DDIM steps, used by abduction and intervention alike.
        abduction_refinement_steps (`int`): default extra UNet passes per inversion step (exact abduction).
    """

    model_cpu_offload_seq = "classifier->unet"
    _callback_tensor_inputs = ["sample"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        classifier: AntiCausalClassifier,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        abduction_refinement_steps: int = 0,
    ):
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        _check_components(unet, scheduler, classifier)
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        self.register_to_config(
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            abduction_refinement_steps=abduction_refinement_steps,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiffSCMPipeline":
        """
        Load a DiffSCMPipeline folder or Hub id (resolved with `snapshot_download`, which also serves the local cache
        offline; diffusers' own download step refuses non-diffusers component libraries).

        Args:
            pretrained_model_name_or_path: a folder written by `save_pretrained` or a Hub model id.
            kwargs: `torch_dtype`; `revision`, `cache_dir`, `token`, `local_files_only` for the download; any other
                keyword overrides a recorded default (`guidance_scale`, `num_inference_steps`, ...) or a component.
        """
        download = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        torch_dtype = kwargs.pop("torch_dtype", None)
        folder = local_pipeline_folder(str(pretrained_model_name_or_path), **download)
        config = _read_pipeline_config(folder)
        components = {
            "unet": lambda: UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype),
            "scheduler": lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
            "classifier": lambda: AntiCausalClassifier.from_pretrained(folder, subfolder="classifier"),
        }
        for name, load in components.items():
            if name not in kwargs:
                kwargs[name] = load()
        defaults = {k: v for k, v in config.items() if not k.startswith("_") and k not in components}
        pipe = cls(**(defaults | kwargs))
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    @torch.no_grad()
    def abduct(
        self,
        image: PipelineImageInput,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        abduction_refinement_steps: int | None = None,
    ) -> torch.Tensor:
        """
        Abduction: the exogenous noise u of each factual image by deterministic DDIM inversion (fp32, no clipping).

        Args:
            image: factual image(s); see [`~diffscm.image_processing.preprocess_images`] for the accepted forms.
            num_inference_steps: DDIM steps of the whole chain; the intervention must use the same number.
            strength: fraction of the chain to invert (1 = up to x_T; the official Diff-SCM code used 0.75).
            abduction_refinement_steps: K extra UNet passes per step. Each step solves x_t = step^-1(x_prev,
                eps(x_t, t)) by fixed-point iteration, so that the generation step from x_t lands back on x_prev,
                starting from the previous step's noise estimate; every pass (1 + K per step) is one iteration.

        Returns:
            `torch.Tensor` `(B, C, H, W)`, float32: the abducted noise, at the intervention's first timestep.
        """
        num_inference_steps = _default(num_inference_steps, self.config.num_inference_steps)
        refinements = _default(abduction_refinement_steps, self.config.abduction_refinement_steps)
        if not isinstance(refinements, int) or refinements < 0:
            raise ValueError(f"`abduction_refinement_steps` must be an integer >= 0, got {refinements!r}.")
        timesteps, alphas = self.get_timesteps(num_inference_steps, strength)
        sample = preprocess_images(image, self.unet.config.in_channels, self.unet.config.sample_size)
        sample = sample.to(self._execution_device)

        eps = torch.zeros_like(sample)  # each step starts from the previous step's noise estimate
        for i in self.progress_bar(reversed(range(len(timesteps))), total=len(timesteps)):
            t, alpha_t, alpha_prev = timesteps[i], alphas[i], alphas[i + 1]
            for _ in range(1 + refinements):  # fixed point of x_t = step^-1(x_prev, eps(x_t, t))
                eps = self.predict_noise(ddim_step(sample, eps, alpha_prev, alpha_t), t)
            sample = ddim_step(sample, eps, alpha_prev, alpha_t)
        return sample

    @torch.no_grad()
    def intervene(
        self,
        noise: torch.Tensor,
        target: TargetInput,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample",),
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """
        Intervention and prediction: DDIM from the abducted `noise` to x_0, guided towards do(parent = `target`).

        Args:
            noise: abducted noise `(B, C, H, W)` from [`abduct`], with the same `num_inference_steps` and `strength`.
            target: one class index per noise sample (an int applies to all).
            guidance_scale: s >= 0; 0 is the null intervention and reproduces the factual.
            eta: 0 for deterministic DDIM; > 0 adds fresh noise drawn from `generator` (then not a reconstruction).
            output_type: `"pt"`, `"np"`, `"pil"`, or `"latent"` for the raw sample in [-1, 1].
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` called after every step;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (`"sample"`), and
                a returned `"sample"` replaces the current one.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        guidance_scale = _default(guidance_scale, self.config.guidance_scale)
        num_inference_steps = _default(num_inference_steps, self.config.num_inference_steps)
        self.check_guidance(guidance_scale, eta)
        self.check_noise(noise)
        if not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be within {self._callback_tensor_inputs}.")
        targets = self.prepare_targets(target, noise.shape[0])
        if targets.shape[1] != 1:
            raise ValueError("`intervene` takes one target per noise sample; repeat `noise` for several targets.")
        timesteps, alphas = self.get_timesteps(num_inference_steps, strength)
        sample = noise.to(self._execution_device, torch.float32)
        target = targets[:, 0].to(sample.device)

        for i, t in enumerate(self.progress_bar(timesteps)):
            alpha_t, alpha_prev = alphas[i], alphas[i + 1]
            eps = self.predict_noise(sample, t)
            if guidance_scale > 0:
                eps = eps - guidance_scale * math.sqrt(1 - alpha_t) * self.log_likelihood_gradient(sample, t, target)
            sample = self.denoising_step(sample, eps, alpha_t, alpha_prev, eta, generator)
            if callback_on_step_end is not None:
                callback_kwargs = {name: {"sample": sample}[name] for name in callback_on_step_end_tensor_inputs}
                sample = callback_on_step_end(self, i, t, callback_kwargs).pop("sample", sample)

        if output_type == "latent":
            return sample
        return self.image_processor.postprocess(sample, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        target: TargetInput,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        abduction_refinement_steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_reconstruction: bool = False,
        return_noise: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample",),
    ) -> DiffSCMPipelineOutput | tuple:
        r"""
        The counterfactual "had the image's parent been `target`": abduction, then intervention and prediction.

        Args:
            image: factual image(s): PIL, numpy channels-last or torch channels-first, floats in [0, 1]; RGB/grey is
                converted to the model's channels and other sizes are resized (with a warning).
            target: the intervened class: an int for all images, a sequence with one per image, a 2-D `(B, K)` array
                for K counterfactuals per image, or `"all"` for every class; one abduction serves all K.
            guidance_scale: s in eps_hat = eps - s sqrt(1 - alpha_bar_t) grad log p_phi(target | x_t, t); defaults
                to the checkpoint's measured choice.
            num_inference_steps: DDIM steps each way (abduction and intervention).
            strength: fraction of the chain that is inverted and regenerated (1 = the whole chain).
            abduction_refinement_steps: extra UNet passes per inversion step for exact abduction.
            eta, generator: stochastic DDIM (eta > 0) with reproducible noise; eta = 0 is deterministic.
            output_type: `"pil"`, `"np"` or `"pt"`.
            return_reconstruction: also run the null intervention (guidance 0) and return it.
            return_noise: also return the abducted noise.
            return_dict: return a [`DiffSCMPipelineOutput`] rather than a tuple of its fields.

        Examples:
        ```py
        >>> from diffscm import DiffSCMPipeline
        >>> pipe = DiffSCMPipeline.from_pretrained("checkpoints/diffscm-mnist")
        >>> out = pipe(image, target=3)  # "what would this digit look like had it been a 3?"
        >>> out.images[0].save("counterfactual.png"), out.target_probabilities
        ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        guidance_scale = _default(guidance_scale, self.config.guidance_scale)
        num_inference_steps = _default(num_inference_steps, self.config.num_inference_steps)
        self.check_guidance(guidance_scale, eta)

        # 1. Abduction: u = DDIM^-1(x_0), once per factual image.
        noise = self.abduct(image, num_inference_steps, strength, abduction_refinement_steps)
        targets = self.prepare_targets(target, noise.shape[0])
        num_targets = targets.shape[1]

        # 2. Intervention and prediction: guided DDIM from the same u towards each target.
        counterfactuals = self.intervene(
            noise.repeat_interleave(num_targets, dim=0),
            targets.flatten(),
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            strength=strength,
            eta=eta,
            generator=generator,
            output_type="latent",
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        reconstructions = None
        if return_reconstruction:
            reconstructions = self.intervene(
                noise, 0, guidance_scale=0.0, num_inference_steps=num_inference_steps, strength=strength,
                output_type="latent",
            )  # fmt: skip
            reconstructions = self.image_processor.postprocess(reconstructions, output_type=output_type)

        probabilities = self.target_probabilities(counterfactuals, targets.flatten())
        output = DiffSCMPipelineOutput(
            images=self.image_processor.postprocess(counterfactuals, output_type=output_type),
            targets=targets.flatten().numpy(),
            target_probabilities=probabilities.cpu().numpy(),
            reconstructions=reconstructions,
            noise=noise if return_noise else None,
        )
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    def get_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> tuple[list[int], list[float]]:
        """The generation timesteps (descending) and alpha-bar before each step and after the last one."""
        train_steps = self.scheduler.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= train_steps:
            raise ValueError(
                f"`num_inference_steps` must be an integer in [1, {train_steps}], got {num_inference_steps}."
            )
        if not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
        self.scheduler.set_timesteps(num_inference_steps)
        num_steps = max(1, round(num_inference_steps * strength))
        timesteps = self.scheduler.timesteps[-num_steps:].tolist()
        alphas = [self.scheduler.alphas_cumprod[t].item() for t in timesteps]
        return timesteps, alphas + [float(self.scheduler.final_alpha_cumprod)]

    def predict_noise(self, sample: torch.Tensor, timestep: int) -> torch.Tensor:
        """eps_theta(x_t, t) in float32 whatever the UNet's dtype."""
        return self.unet(sample.to(self.unet.dtype), timestep).sample.float()

    def log_likelihood_gradient(self, sample: torch.Tensor, timestep: int, target: torch.Tensor) -> torch.Tensor:
        """grad_{x_t} log p_phi(target | x_t, t); the gradient flows through the anti-causal predictor only."""
        with torch.enable_grad():
            sample = sample.detach().to(self.classifier.dtype).requires_grad_(True)
            logits = self.classifier(sample, timestep).logits.float()
            log_likelihood = logits.log_softmax(dim=-1).gather(1, target[:, None]).sum()
            return torch.autograd.grad(log_likelihood, sample)[0].float()

    def target_probabilities(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """p_phi(target | x_0) of clean samples in [-1, 1]."""
        logits = self.classifier(sample.clamp(-1, 1).to(self.classifier.dtype), 0).logits.float()
        return logits.softmax(dim=-1).gather(1, target[:, None].to(logits.device)).squeeze(1)

    def denoising_step(self, sample, eps, alpha_t, alpha_prev, eta, generator) -> torch.Tensor:
        """DDIM step x_t -> x_prev (Song et al. 2021, eq. 12); deterministic when `eta` is 0."""
        if eta == 0:
            return ddim_step(sample, eps, alpha_t, alpha_prev)
        sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
        pred_original = (sample - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
        fresh = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        direction = math.sqrt(max(1 - alpha_prev - sigma**2, 0.0)) * eps
        return math.sqrt(alpha_prev) * pred_original + direction + sigma * fresh

    def prepare_targets(self, target: TargetInput, batch_size: int) -> torch.Tensor:
        """Validated targets as a `(batch_size, K)` long tensor."""
        num_classes = self.classifier.config.num_classes
        if _is_all(target):
            return torch.arange(num_classes).expand(batch_size, -1)
        if isinstance(target, str):
            raise ValueError(f"`target` must be a class index or 'all', got {target!r}.")
        targets = torch.as_tensor(target)
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"`target` must hold integer class indices, got {target!r}.")
        targets = targets.long().cpu()
        if targets.ndim == 0:
            targets = targets.expand(batch_size)
        if targets.ndim > 2 or targets.shape[0] != batch_size:
            raise ValueError(
                f"`target` must be an int, one per image ({batch_size}) or a ({batch_size}, K) array; "
                f"got shape {tuple(targets.shape)}."
            )
        if targets.numel() == 0 or targets.min() < 0 or targets.max() >= num_classes:
            raise ValueError(f"`target` must be class indices in [0, {num_classes - 1}], got {target!r}.")
        return targets.reshape(batch_size, -1)

    def check_guidance(self, guidance_scale: float, eta: float):
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}.")
        if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"`eta` must be in [0, 1], got {eta!r}.")

    def check_noise(self, noise: torch.Tensor):
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape[1:]) != (channels, size, size):
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"`noise` must be a tensor (B, {channels}, {size}, {size}) from `abduct`; got {shape}.")
        if not torch.isfinite(noise).all():
            raise ValueError("`noise` contains NaN or infinite values.")


def _check_components(unet: UNet2DModel, scheduler: DDIMScheduler, classifier: AntiCausalClassifier):
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"Only epsilon-prediction UNets are supported, got {scheduler.config.prediction_type!r}.")
    for name in ("in_channels", "sample_size"):
        if unet.config[name] != classifier.config[name]:
            raise ValueError(
                f"The UNet and the anti-causal classifier disagree on {name}: "
                f"{unet.config[name]} vs {classifier.config[name]}."
            )


def local_pipeline_folder(name_or_path: str, **download) -> str:
    """A pipeline folder as is, or a Hub id's local snapshot (downloaded, or from the cache offline)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{name_or_path!r} is not a pipeline folder (and not a Hub id).")
    return snapshot_download(name_or_path, **download)


def _read_pipeline_config(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a DiffSCMPipeline folder: it has no model_index.json.")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt: {error}") from error
    class_name = config.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    missing = {"unet", "scheduler", "classifier"} - set(config)
    if class_name != DiffSCMPipeline.__name__ or missing:
        raise ValueError(
            f"{folder} holds a {class_name} pipeline, not a DiffSCMPipeline (with unet, scheduler and classifier)."
        )
    return config


def _default(value, default):
    return default if value is None else value


def _is_all(target) -> bool:
    return isinstance(target, str) and target == "all"
