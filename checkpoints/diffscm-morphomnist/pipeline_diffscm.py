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
from .anticausal import AntiCausalClassifier, AntiCausalPredictor
from .scm import CausalGraph

TargetInput = int | str | list | np.ndarray | torch.Tensor
ValuesInput = dict[str, float | int | list | np.ndarray | torch.Tensor]
PREDICTORS = {cls.__name__: cls for cls in (AntiCausalClassifier, AntiCausalPredictor)}


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
            from each counterfactual (a guide, not an independent judge).
        targets (`np.ndarray` of shape `(B*K,)`): with `target=`, the intervened class of each counterfactual.
        target_probabilities (`np.ndarray` of shape `(B*K,)`): with `target=`, p_phi(target | counterfactual, t=0).
        reconstructions: the null-intervention (guidance 0) results, one per input image, when asked for.
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


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM move from alpha-bar `alpha_from` to `alpha_to`; its own inverse when the two are swapped."""
    pred_original = (sample - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * pred_original + math.sqrt(1 - alpha_to) * eps


class DiffSCMPipeline(DiffusionPipeline):
    r"""
    Counterfactual image generation with a diffusion model as the image's causal mechanism (Diff-SCM).

    1. Abduction: deterministic DDIM inversion of the factual image x_0 to its exogenous noise u = x_T, and the noise
       of every other variable of the causal graph through the inverse of its mechanism.
    2. Action: do(variable = value); descendants follow through their mechanisms with their abducted noise.
    3. Prediction: DDIM from u back to x_0, guided by the anti-causal predictors p_phi(pa_k | x_t, t) towards the
       counterfactual values pa_k* of all the image's parents at once:
       eps_hat = eps_theta(x_t, t) - sqrt(1 - alpha_bar_t) * sum_k s_k grad_{x_t} log p_phi(pa_k* | x_t, t).

    Parameters:
        unet ([`UNet2DModel`]): the noise model eps_theta (epsilon prediction).
        scheduler ([`DDIMScheduler`]): its noise schedule; any scheduler config is read as a DDIM one.
        classifier ([`AntiCausalClassifier`] or [`AntiCausalPredictor`]): the noise-aware anti-causal predictor(s)
            of the image's parents, trained on the same schedule.
        causal_graph (`dict`): `{"nodes": [...]}`, the [`~diffscm.scm.CausalGraph`] config; by default the
            classifier's single categorical parent -> image.
        guidance_scale (`float` or `dict`): default guidance scale s, or one per parent of the image, chosen by
            measurement for the shipped checkpoints.
        num_inference_steps (`int`): default number of DDIM steps, used by abduction and intervention alike.
        abduction_refinement_steps (`int`): default extra UNet passes per inversion step (exact abduction).
    """

    model_cpu_offload_seq = "classifier->unet"
    _callback_tensor_inputs = ["sample"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        classifier: AntiCausalClassifier | AntiCausalPredictor,
        causal_graph: dict | None = None,
        guidance_scale: float | dict = 1.0,
        num_inference_steps: int = 50,
        abduction_refinement_steps: int = 0,
    ):
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        if causal_graph is None:
            (parent, spec), *_ = classifier.parents.items()
            self.causal_graph = CausalGraph.single_parent(parent, spec["num_classes"])
        else:
            self.causal_graph = CausalGraph.from_config(causal_graph)
        _check_components(unet, scheduler, classifier, self.causal_graph)
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        self.register_to_config(
            causal_graph=self.causal_graph.to_config(),
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            abduction_refinement_steps=abduction_refinement_steps,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)
        self.guidance_scales(guidance_scale)

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
            "classifier": lambda: PREDICTORS[config["classifier"][1]].from_pretrained(folder, subfolder="classifier"),
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
        return self.invert(self.preprocess(image), num_inference_steps, strength, abduction_refinement_steps)

    def preprocess(self, image: PipelineImageInput) -> torch.Tensor:
        """Factual image(s) as a float32 `(B, C, H, W)` tensor in [-1, 1] of the model's size, on its device."""
        sample = preprocess_images(image, self.unet.config.in_channels, self.unet.config.sample_size)
        return sample.to(self._execution_device)

    @torch.no_grad()
    def invert(
        self,
        sample: torch.Tensor,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        abduction_refinement_steps: int | None = None,
    ) -> torch.Tensor:
        """The DDIM inversion of [`abduct`] for a preprocessed `sample` in [-1, 1]."""
        num_inference_steps = _default(num_inference_steps, self.config.num_inference_steps)
        refinements = _default(abduction_refinement_steps, self.config.abduction_refinement_steps)
        if not isinstance(refinements, int) or refinements < 0:
            raise ValueError(f"`abduction_refinement_steps` must be an integer >= 0, got {refinements!r}.")
        timesteps, alphas = self.get_timesteps(num_inference_steps, strength)

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
        target: TargetInput | ValuesInput | None,
        guidance_scale: float | dict | None = None,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample",),
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """
        Prediction: DDIM from the abducted `noise` to x_0, guided towards the counterfactual values of the image's
        parents.

        Args:
            noise: abducted noise `(B, C, H, W)` from [`abduct`], with the same `num_inference_steps` and `strength`.
            target: the counterfactual value of every parent of the image, `{parent: value or one per sample}`; for
                a graph whose image has one categorical parent, also just the class (an int or one per sample);
                None for the null intervention (no guidance).
            guidance_scale: s >= 0, or `{parent: s}` (parents left out keep their default); 0 everywhere is the null
                intervention and reproduces the factual.
            eta: 0 for deterministic DDIM; > 0 adds fresh noise drawn from `generator` (then not a reconstruction).
            output_type: `"pt"`, `"np"`, `"pil"`, or `"latent"` for the raw sample in [-1, 1].
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` called after every step;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (`"sample"`), and
                a returned `"sample"` replaces the current one.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        scales = self.guidance_scales(guidance_scale)
        num_inference_steps = _default(num_inference_steps, self.config.num_inference_steps)
        self.check_guidance(0.0, eta)
        self.check_noise(noise)
        if not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be within {self._callback_tensor_inputs}.")
        if isinstance(generator, list) and len(generator) != noise.shape[0]:
            raise ValueError(f"Got {len(generator)} generators for {noise.shape[0]} samples; pass one per sample.")
        if target is None and any(scales.values()):
            raise ValueError("`target` is needed unless the guidance scale is 0 (the null intervention).")
        values = None if target is None else self.prepare_parent_values(target, noise.shape[0])
        timesteps, alphas = self.get_timesteps(num_inference_steps, strength)
        sample = noise.to(self._execution_device, torch.float32)

        for i, t in enumerate(self.progress_bar(timesteps)):
            alpha_t, alpha_prev = alphas[i], alphas[i + 1]
            eps = self.predict_noise(sample, t)
            if values is not None and any(scales.values()):
                eps = eps - math.sqrt(1 - alpha_t) * self.log_likelihood_gradient(sample, t, values, scales)
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
        target: TargetInput | None = None,
        intervention: ValuesInput | None = None,
        factual_values: ValuesInput | None = None,
        guidance_scale: float | dict | None = None,
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
        The counterfactual "had `intervention` held": abduction, action on the causal graph, guided prediction.

        Args:
            image: factual image(s): PIL, numpy channels-last or torch channels-first, floats in [0, 1]; RGB/grey is
                converted to the model's channels and other sizes are resized (with a warning).
            target: shorthand when the image has one categorical parent: the intervened class, as an int for all
                images, one per image, a 2-D `(B, K)` array for K counterfactuals per image, or `"all"` for every
                class; one abduction serves all K.
            intervention: do() on any variables of the causal graph, `{name: value or one per image}`, e.g.
                `{"thickness": 4.0}` or `{"digit": 3, "intensity": 200}`; descendants follow their mechanisms.
            factual_values: known factual values `{name: value or one per image}`; the image's parents not given
                are predicted from the image (listed in the output's `predicted_factuals`).
            guidance_scale: s, or `{parent: s}` one per parent of the image; defaults to the checkpoint's measured
                choice.
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
        >>> pipe = DiffSCMPipeline.from_pretrained("checkpoints/diffscm-morphomnist")
        >>> out = pipe(image, intervention={"thickness": 4.0})  # intensity follows thickness through its mechanism
        >>> out.images[0].save("counterfactual.png"), out.counterfactual_values
        ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if (target is None) == (intervention is None):
            raise ValueError("Give either `target` or `intervention` (a dict of variable values).")
        self.guidance_scales(guidance_scale)
        self.check_guidance(0.0, eta)
        num_inference_steps = _default(num_inference_steps, self.config.num_inference_steps)
        sample = self.preprocess(image)

        # The requested action and the factual values, checked before the costly abduction.
        batch_size = sample.shape[0]
        if target is not None:
            targets = self.prepare_targets(target, batch_size)
            num_targets = targets.shape[1]
            intervention = {self.single_categorical_parent(): targets.flatten().numpy()}
        else:
            if not isinstance(intervention, dict) or not intervention:
                raise ValueError(f"`intervention` must be a non-empty dict {{variable: value}}, got {intervention!r}.")
            num_targets = 1
            intervention = {k: self._per_image(k, v, batch_size) for k, v in intervention.items()}
        factual, predicted = self.infer_factual_values(sample, factual_values)
        factual_repeated = {k: np.repeat(v, num_targets) for k, v in factual.items()}

        # 1. Abduction: u = DDIM^-1(x_0) once per factual image (the other variables' noise: inside the graph).
        noise = self.invert(sample, num_inference_steps, strength, abduction_refinement_steps)

        # 2. Action: do(intervention), descendants recomputed from their abducted noise.
        counterfactual = self.causal_graph.counterfactual(factual_repeated, intervention)

        # 3. Prediction: guided DDIM from the same u towards the counterfactual values of all the image's parents.
        counterfactuals = self.intervene(
            noise.repeat_interleave(num_targets, dim=0),
            {name: counterfactual[name] for name in self.causal_graph.image_parents},
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
                noise, None, guidance_scale=0.0, num_inference_steps=num_inference_steps, strength=strength,
                output_type="latent",
            )  # fmt: skip
            reconstructions = self.image_processor.postprocess(reconstructions, output_type=output_type)

        clean = counterfactuals.clamp(-1, 1)
        estimates = self.classifier.predict(clean.to(self.classifier.dtype), 0)
        output = DiffSCMPipelineOutput(
            images=self.image_processor.postprocess(counterfactuals, output_type=output_type),
            counterfactual_values=counterfactual,
            factual_values=factual,
            predicted_factuals=predicted,
            predicted_values={name: value.detach().cpu().numpy() for name, value in estimates.items()},
            reconstructions=reconstructions,
            noise=noise if return_noise else None,
        )
        if target is not None:
            output.targets = targets.flatten().numpy()
            output.target_probabilities = self.target_probabilities(clean, targets.flatten()).cpu().numpy()
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    def infer_factual_values(self, sample: torch.Tensor, given: ValuesInput | None) -> tuple[dict, list[str]]:
        """Factual values: those `given`, and the image's parents not given predicted from the clean image by the
        anti-causal predictor (conditions from the given values). Returns the values and the predicted names."""
        graph, size = self.causal_graph, sample.shape[0]
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"`factual_values` must be a dict {{variable: value}}, got {given!r}.")
        values = {name: self._per_image(name, value, size) for name, value in (given or {}).items()}
        predicted = [name for name in graph.image_parents if name not in values]
        if predicted:
            known = {name: torch.as_tensor(value, device=sample.device) for name, value in values.items()}
            estimates = self.classifier.predict(sample.to(self.classifier.dtype), 0, given=known)
            for name in predicted:
                estimate = estimates[name].float().cpu().numpy()
                node = graph.nodes[name]
                values[name] = (
                    estimate.astype(np.int64) if node.type == "categorical" else np.clip(estimate, *node.range)
                )
        return values, predicted

    def _per_image(self, name: str, value, size: int) -> np.ndarray:
        array = self.causal_graph.check_value(name, value.cpu() if isinstance(value, torch.Tensor) else value)
        if array.ndim == 1 and len(array) != size:
            raise ValueError(f"{name!r} has {len(array)} values for {size} images.")
        return np.broadcast_to(array, (size,)).copy()

    def single_categorical_parent(self) -> str:
        """The image's only parent, for the `target=` shorthand."""
        parents = self.causal_graph.image_parents
        if len(parents) != 1 or self.causal_graph.nodes[parents[0]].type != "categorical":
            raise ValueError(
                f"`target` is shorthand for an image with one categorical parent; this graph's image has parents "
                f"{list(parents)}: use `intervention={{name: value}}`."
            )
        return parents[0]

    def guidance_scales(self, guidance_scale: float | dict | None = None) -> dict[str, float]:
        """The guidance scale of every parent of the image: the given one(s) over the checkpoint's default(s)."""
        parents = self.causal_graph.image_parents
        scales = {}
        for scale in (self.config.guidance_scale, guidance_scale):
            if scale is None:
                continue
            if not isinstance(scale, dict):
                scale = dict.fromkeys(parents, scale)
            unknown = set(scale) - set(parents)
            if unknown:
                raise ValueError(
                    f"`guidance_scale` names {sorted(unknown)}, not parents of the image {list(parents)}."
                )
            for name, value in scale.items():
                self.check_guidance(value, 0.0)
                scales[name] = float(value)
        return {name: scales.get(name, 0.0) for name in parents}

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

    def log_likelihood_gradient(
        self, sample: torch.Tensor, timestep: int, values: dict[str, torch.Tensor], scales: dict[str, float]
    ) -> torch.Tensor:
        """grad_{x_t} sum_k s_k log p_phi(pa_k = values[k] | x_t, t); the gradient flows through the predictor only."""
        with torch.enable_grad():
            sample = sample.detach().to(self.classifier.dtype).requires_grad_(True)
            log_likelihoods = self.classifier.log_likelihood(sample, timestep, values)
            total = sum(scales[name] * log_likelihoods[name].sum() for name in scales if scales[name])
            return torch.autograd.grad(total, sample)[0].float()

    def target_probabilities(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """p_phi(target | x_0) of clean samples in [-1, 1], for the image's single categorical parent."""
        parent = self.single_categorical_parent()
        sample = sample.clamp(-1, 1).to(self.classifier.dtype)
        return self.classifier.log_likelihood(sample, 0, {parent: target.to(sample.device)})[parent].exp()

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
        num_classes = self.causal_graph.nodes[self.single_categorical_parent()].num_classes
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

    def prepare_parent_values(self, target: TargetInput | ValuesInput, batch_size: int) -> dict[str, torch.Tensor]:
        """Validated values of every parent of the image, one per sample, as tensors on the execution device."""
        parents = self.causal_graph.image_parents
        if not isinstance(target, dict):
            targets = self.prepare_targets(target, batch_size)
            if targets.shape[1] != 1:
                raise ValueError("`intervene` takes one target per noise sample; repeat `noise` for several targets.")
            target = {self.single_categorical_parent(): targets[:, 0]}
        if set(target) != set(parents):
            raise ValueError(
                f"`intervene` needs the values of all the image's parents {list(parents)}, got {sorted(target)}."
            )
        return {
            name: torch.as_tensor(self._per_image(name, value, batch_size), device=self._execution_device)
            for name, value in target.items()
        }

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


def _check_components(unet: UNet2DModel, scheduler: DDIMScheduler, classifier, graph: CausalGraph):
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"Only epsilon-prediction UNets are supported, got {scheduler.config.prediction_type!r}.")
    for name in ("in_channels", "sample_size"):
        if unet.config[name] != classifier.config[name]:
            raise ValueError(
                f"The UNet and the anti-causal predictor disagree on {name}: "
                f"{unet.config[name]} vs {classifier.config[name]}."
            )
    if set(classifier.parents) != set(graph.image_parents):
        raise ValueError(
            f"The anti-causal predictor predicts {sorted(classifier.parents)}, but the image's parents in the causal "
            f"graph are {sorted(graph.image_parents)}."
        )
    for name, spec in classifier.parents.items():
        node = graph.nodes[name]
        if spec["type"] != node.type or spec.get("num_classes") != node.num_classes:
            raise ValueError(f"The anti-causal predictor's {name!r} ({spec}) does not match the graph's {node}.")


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
    predictor = config["classifier"][-1] if isinstance(config["classifier"], list) else None
    if predictor not in PREDICTORS:
        raise ValueError(f"{path}: unknown anti-causal predictor {predictor!r}; expected one of {sorted(PREDICTORS)}.")
    return config


def _default(value, default):
    return default if value is None else value


def _is_all(target) -> bool:
    return isinstance(target, str) and target == "all"
