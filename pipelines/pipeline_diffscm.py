"""Diff-SCM (Sanchez & Tsaftaris, CLeaR 2022): counterfactual images by DDIM abduction and intervention."""

import inspect
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from huggingface_hub import snapshot_download

from diffscm.image_processing import PipelineImageInput, preprocess_images
from diffscm.models.anticausal import AntiCausalClassifier, AntiCausalPredictor
from diffscm.models.explained_classifier import ExplainedClassifier
from diffscm.models.parent_embedding import ParentEmbedding
from diffscm.scm import CausalGraph

TargetInput = int | str | list | np.ndarray | torch.Tensor
ValuesInput = dict[str, float | int | list | np.ndarray | torch.Tensor]
ScaleInput = float | dict[str, float]
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
            from each counterfactual (a guide, not an independent judge); empty without a predictor.
        targets (`np.ndarray` of shape `(B*K,)`): with `target=`, the intervened class of each counterfactual.
        target_probabilities (`np.ndarray` of shape `(B*K,)`): with `target=`, p_phi(target | counterfactual, t=0).
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


@dataclass
class Abduction(BaseOutput):
    """
    The result of abduction: the exogenous noise of each factual image and what it was abducted under. [`intervene`]
    follows these settings, so the prediction runs the very chain that the inversion ran.

    Args:
        noise (`torch.Tensor` `(B, C, H, W)`, float32): u, at the intervention's first timestep.
        factual_values (`dict[str, np.ndarray]`): the factual value of each parent of the image, one per sample (a
            conditional mechanism was inverted under them; anti-causal guidance acts only on samples whose parents
            change).
        num_inference_steps (`int`), strength (`float`), abduction_refinement_steps (`int`): the DDIM chain.
        cfg_scale (`dict[str, float]`): the classifier-free guidance scale of each parent (conditional mechanism).
    """

    noise: torch.Tensor
    factual_values: dict[str, np.ndarray]
    num_inference_steps: int
    strength: float
    abduction_refinement_steps: int
    cfg_scale: dict[str, float]

    @property
    def batch_size(self) -> int:
        return self.noise.shape[0]

    def repeat_interleave(self, repeats: int) -> "Abduction":
        """Every sample repeated `repeats` times in a row, for several interventions from one abduction."""
        values = {name: np.repeat(value, repeats) for name, value in self.factual_values.items()}
        return replace(self, noise=self.noise.repeat_interleave(repeats, dim=0), factual_values=values)

    def select(self, index) -> "Abduction":
        """The samples at `index` (a slice, or a list / array of positions)."""
        positions = np.arange(self.batch_size)[index]
        values = {name: value[positions] for name, value in self.factual_values.items()}
        return replace(self, noise=self.noise[torch.as_tensor(positions)], factual_values=values)


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
    3. Prediction: DDIM from u back to x_0 under the counterfactual values pa* of the image's parents.

    The image's mechanism is one of two kinds, which the checkpoint records by having a `parent_embedding` or not:

    - **classifier-guided** (the paper's): an unconditional eps_theta(x_t, t) steered by the noise-aware anti-causal
      predictors, eps_hat = eps_theta(x_t, t) - sqrt(1 - alpha_bar_t) sum_k s_k grad log p_phi(pa_k* | x_t, t);
    - **conditional**: eps_theta(x_t, t, pa), the structural mechanism x = f(pa, u) itself, inverted under the
      factual parents and run under the counterfactual ones, with classifier-free guidance per parent,
      eps_hat = eps(pa) + sum_k (w_k - 1) (eps(pa) - eps(pa without k)), the same in both directions; anti-causal
      guidance may act on top.

    Anti-causal guidance acts on every parent of a sample whose parents the intervention changes (the unchanged ones
    are held at their factual values), and on none of a sample it leaves unchanged, so that do(parents = factual
    values) returns the factual image.

    Parameters:
        unet ([`UNet2DModel`]): the noise model eps_theta (epsilon prediction); `class_embed_type="identity"` for a
            conditional mechanism.
        scheduler ([`DDIMScheduler`]): its noise schedule; any scheduler config is read as a DDIM one.
        classifier ([`AntiCausalClassifier`] or [`AntiCausalPredictor`], *optional* for a conditional mechanism):
            the noise-aware anti-causal predictor(s) of the image's parents, trained on the same schedule; they
            guide, and predict factual values that are not given.
        parent_embedding ([`ParentEmbedding`], *optional*): the parents as the UNet's class conditioning; present
            for a conditional mechanism.
        causal_graph (`dict`): `{"nodes": [...]}`, the [`~diffscm.scm.CausalGraph`] config; by default the
            classifier's single categorical parent -> image.
        guidance_scale (`float` or `dict`): default anti-causal guidance scale s, or one per parent of the image
            (default 1 with a predictor, 0 without).
        cfg_scale (`float` or `dict`): default classifier-free guidance scale w per parent (conditional mechanism;
            1 = plain conditioning).
        num_inference_steps (`int`): default number of DDIM steps, used by abduction and intervention alike.
        abduction_refinement_steps (`int`): default extra UNet passes per inversion step (exact abduction).
    """

    model_cpu_offload_seq = "classifier->parent_embedding->unet"
    _optional_components = ["classifier", "parent_embedding"]
    _callback_tensor_inputs = ["sample"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        classifier: AntiCausalClassifier | AntiCausalPredictor | None = None,
        parent_embedding: ParentEmbedding | None = None,
        causal_graph: dict | None = None,
        guidance_scale: ScaleInput | None = None,
        cfg_scale: ScaleInput = 1.0,
        num_inference_steps: int = 50,
        abduction_refinement_steps: int = 0,
    ):
        super().__init__()
        if guidance_scale is None:
            guidance_scale = 1.0 if classifier is not None else 0.0
        if not isinstance(scheduler, DDIMScheduler) or scheduler.config.clip_sample or scheduler.config.thresholding:
            # DDIM (abduction inverts it), never clipped: a clipped step cannot be inverted.
            scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)
        if causal_graph is not None:
            self.causal_graph = CausalGraph.from_config(causal_graph)
        elif classifier is not None:
            (parent, spec), *_ = classifier.parents.items()
            self.causal_graph = CausalGraph.single_parent(parent, spec["num_classes"])
        elif parent_embedding is not None:
            (parent, spec), *_ = parent_embedding.parents.items()
            self.causal_graph = CausalGraph.single_parent(parent, spec["num_classes"])
        else:
            raise ValueError("A DiffSCMPipeline needs an anti-causal `classifier`, a `parent_embedding`, or both.")
        _check_components(unet, scheduler, classifier, parent_embedding, self.causal_graph)
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier, parent_embedding=parent_embedding)
        self.register_to_config(
            causal_graph=self.causal_graph.to_config(),
            guidance_scale=guidance_scale,
            cfg_scale=cfg_scale,
            num_inference_steps=num_inference_steps,
            abduction_refinement_steps=abduction_refinement_steps,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)
        self.guidance_scales(guidance_scale)
        self.cfg_scales(cfg_scale)

    @property
    def mechanism(self) -> str:
        """`"conditional"` (eps_theta(x_t, t, pa)) or `"classifier-guided"` (eps_theta(x_t, t) and p_phi)."""
        return "conditional" if self.parent_embedding is not None else "classifier-guided"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiffSCMPipeline":
        """
        Load a DiffSCMPipeline folder or Hub id (resolved with `snapshot_download`, which also serves the local cache
        offline; diffusers' own download step refuses non-diffusers component libraries).

        Args:
            pretrained_model_name_or_path: a folder written by `save_pretrained` or a Hub model id.
            kwargs: `torch_dtype` for every component loaded (unet, classifier, parent_embedding), or a dict
                `{component: dtype, "default": dtype}` as in diffusers; abduction and the guidance stay in float32.
                `revision`, `cache_dir`, `token`, `local_files_only` for the download; any other keyword overrides
                a recorded default (`guidance_scale`, `num_inference_steps`, ...) or a component.
        """
        download = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        torch_dtype = kwargs.pop("torch_dtype", None)
        folder = local_pipeline_folder(str(pretrained_model_name_or_path), **download)
        config = _read_pipeline_config(folder)

        def dtype(name: str) -> torch.dtype | None:  # one for all, or diffusers' {name: dtype, "default": dtype}
            if isinstance(torch_dtype, dict):
                return torch_dtype.get(name, torch_dtype.get("default", torch.float32))
            return torch_dtype

        components = {
            "unet": lambda: UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype("unet")),
            "scheduler": lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
            "classifier": lambda: PREDICTORS[config["classifier"][1]].from_pretrained(
                folder, subfolder="classifier", torch_dtype=dtype("classifier")
            ),
            "parent_embedding": lambda: ParentEmbedding.from_pretrained(
                folder, subfolder="parent_embedding", torch_dtype=dtype("parent_embedding")
            ),
        }
        for name, load in components.items():
            recorded = config.get(name, [None, None])
            if name not in kwargs and recorded[-1] is not None:
                kwargs[name] = _load_component(folder, name, load)
        defaults = {k: v for k, v in config.items() if not k.startswith("_") and k not in components}
        pipe = cls(**(defaults | kwargs))
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """
        diffusers' `save_pretrained`, plus this pipeline's code (the pipeline, its components' classes, image
        processing and the causal graph), so that plain diffusers loads the folder with
        `DiffusionPipeline.from_pretrained(folder_or_hub_id, trust_remote_code=True)`, however the pipeline was built;
        and its model card `README.md`, rendered from the folder's files, so that a `training.json` or
        `evaluation.md` already there stays in the card (without diffscm installed, the card is skipped).
        """
        import importlib

        if kwargs.get("push_to_hub"):
            raise ValueError("Save first, then push the folder with `diffscm.hub.push_to_hub` (it adds the card).")
        super().save_pretrained(save_directory, **kwargs)
        write_remote_code(self, save_directory)
        try:  # by name: loading the shipped code must not need diffscm (diffusers checks the imports it sees)
            model_cards = importlib.import_module("diffscm.model_cards")
        except ImportError:
            from diffusers.utils import logging

            logging.get_logger(__name__).warning(
                f"Saved {save_directory} without its model card (README.md): diffscm, which renders it, is not "
                "installed."
            )
            return
        model_cards.write_model_card(save_directory)

    @torch.no_grad()
    def abduct(
        self,
        image: PipelineImageInput,
        factual_values: ValuesInput | None = None,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        abduction_refinement_steps: int | None = None,
        cfg_scale: ScaleInput | None = None,
    ) -> Abduction:
        """
        Abduction: the exogenous noise u of each factual image by deterministic DDIM inversion (fp32, no clipping).

        Args:
            image: factual image(s); see [`~diffscm.image_processing.preprocess_images`] for the accepted forms.
            factual_values: the image's parents' factual values `{name: value or one per image}`; those not given
                are predicted by the anti-causal predictor at t = 0.
            num_inference_steps: DDIM steps of the whole chain.
            strength: fraction of the chain to invert (1 = up to x_T; the official Diff-SCM code used 0.75).
            abduction_refinement_steps: K extra UNet passes per step. Each step solves x_t = step^-1(x_prev,
                eps(x_t, t)) by fixed-point iteration, so that the generation step from x_t lands back on x_prev,
                starting from the previous step's noise estimate; every pass (1 + K per step) is one iteration.
            cfg_scale: classifier-free guidance scale per parent (conditional mechanism); the intervention uses it.

        Returns:
            [`Abduction`]: the noise and the settings that [`intervene`] follows.
        """
        sample = self.preprocess(image)
        factual, _ = self.infer_factual_values(sample, factual_values)
        parents = {name: factual[name] for name in self.causal_graph.image_parents}
        return self.invert(sample, parents, num_inference_steps, strength, abduction_refinement_steps, cfg_scale)

    def preprocess(self, image: PipelineImageInput) -> torch.Tensor:
        """Factual image(s) as a float32 `(B, C, H, W)` tensor in [-1, 1] of the model's size, on its device."""
        sample = preprocess_images(image, self.unet.config.in_channels, self.unet.config.sample_size)
        return sample.to(self._execution_device)

    @torch.no_grad()
    def invert(
        self,
        sample: torch.Tensor,
        factual_values: dict[str, np.ndarray],
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        abduction_refinement_steps: int | None = None,
        cfg_scale: ScaleInput | None = None,
    ) -> Abduction:
        """The DDIM inversion of [`abduct`] for a preprocessed `sample` in [-1, 1] and the factual values of all the
        image's parents, one per sample."""
        num_inference_steps = _check_count("num_inference_steps", num_inference_steps, self.config.num_inference_steps)
        refinements = _check_count(
            "abduction_refinement_steps", abduction_refinement_steps, self.config.abduction_refinement_steps, 0
        )
        cfg_scales = self.cfg_scales(cfg_scale)
        timesteps, alphas = self.get_timesteps(num_inference_steps, strength)
        parents = self.prepare_parent_values(factual_values, sample.shape[0])

        eps = torch.zeros_like(sample)  # each step starts from the previous step's noise estimate
        for i in self.progress_bar(reversed(range(len(timesteps))), total=len(timesteps)):
            t, alpha_t, alpha_prev = timesteps[i], alphas[i], alphas[i + 1]
            for _ in range(1 + refinements):  # fixed point of x_t = step^-1(x_prev, eps(x_t, t))
                eps = self.predict_noise(ddim_step(sample, eps, alpha_prev, alpha_t), t, parents, cfg_scales)
            sample = ddim_step(sample, eps, alpha_prev, alpha_t)
        _check_finite(sample, "The abducted noise", cfg_scales)
        return Abduction(
            noise=sample,
            factual_values={name: value.cpu().numpy() for name, value in parents.items()},
            num_inference_steps=num_inference_steps,
            strength=float(strength),
            abduction_refinement_steps=refinements,
            cfg_scale=cfg_scales,
        )

    @torch.no_grad()
    def intervene(
        self,
        abduction: Abduction,
        target: TargetInput | ValuesInput | None = None,
        guidance_scale: ScaleInput | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample",),
        classifier: torch.nn.Module | None = None,
        classifier_processor=None,
        classifier_gradient: str = "cheap",
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """
        Prediction: DDIM from the abducted noise to x_0 under the counterfactual values of the image's parents, with
        the abduction's steps, strength and classifier-free guidance.

        Args:
            abduction: the [`Abduction`] returned by [`abduct`] (or `Abduction.repeat_interleave` of it).
            target: the counterfactual value of every parent of the image, `{parent: value or one per sample}`; for
                a graph whose image has one categorical parent, also just the class (an int or one per sample);
                None for the null intervention (the factual values).
            guidance_scale: anti-causal guidance scale s >= 0, or `{parent: s}` (parents left out keep their
                default); it acts only on samples whose parents differ from the factual ones, towards all their
                counterfactual values.
            eta: 0 for deterministic DDIM; > 0 adds fresh noise drawn from `generator` (then not a reconstruction).
            output_type: `"pt"`, `"np"`, `"pil"`, or `"latent"` for the raw sample in [-1, 1].
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` called after every step;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (`"sample"`), and
                a returned `"sample"` replaces the current one.
            classifier: a clean image classifier to explain instead of the noise-aware predictor, e.g. any
                transformers `AutoModelForImageClassification` (or an [`ExplainedClassifier`]): the guidance of the
                image's categorical parent becomes grad log p(target | x0_hat(x_t)) with x0_hat the DDIM estimate of
                the clean image; the targets are the classifier's class indices.
            classifier_processor: its image processor (resizing and normalisation, applied differentiably).
            classifier_gradient: `"cheap"` (x0_hat's noise estimate held constant: one classifier backward pass per
                step) or `"full"` (backpropagated through the UNet as well).

        Returns:
            The counterfactual images in the requested `output_type`.

        Examples:
        ```py
        >>> abduction = pipe.abduct(image, num_inference_steps=25)
        >>> counterfactual = pipe.intervene(abduction, target=3, guidance_scale=12.0)  # the chain of the abduction
        >>> explained = pipe.intervene(abduction, target=3, classifier=vit, classifier_processor=processor)
        ```
        """
        if not isinstance(abduction, Abduction):
            raise TypeError(
                f"`intervene` takes the Abduction returned by `abduct` (it carries the chain's settings), got "
                f"{type(abduction).__name__}."
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        explained = self.explained_classifier(classifier, classifier_processor, classifier_gradient)
        scales = self.guidance_scales(guidance_scale, explained=explained is not None)
        _check_eta(eta)
        self.check_noise(abduction.noise)
        if not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be within {self._callback_tensor_inputs}.")
        size = abduction.batch_size
        if isinstance(generator, list) and len(generator) != size:
            raise ValueError(f"Got {len(generator)} generators for {size} samples; pass one per sample.")
        factual = self.prepare_parent_values(abduction.factual_values, size)
        values = factual if target is None else self.prepare_parent_values(target, size)
        intervened = torch.stack([values[name] != factual[name] for name in values]).any(0)  # guidance acts on these
        guided = {name: scale * intervened.float() for name, scale in scales.items() if scale and intervened.any()}
        explained_scale = None
        if explained is not None:
            parent = self.single_categorical_parent()
            if values[parent].max() >= explained.num_labels:
                raise ValueError(
                    f"`target` {values[parent].max().item()} is not a class of the explained classifier, which has "
                    f"{explained.num_labels} labels."
                )
            explained_scale = guided.pop(parent, None)
        timesteps, alphas = self.get_timesteps(abduction.num_inference_steps, abduction.strength)
        sample = abduction.noise.to(self._execution_device, torch.float32)

        for i, t in enumerate(self.progress_bar(timesteps)):
            if explained_scale is not None and classifier_gradient == "full":
                eps, gradient = self.explained_gradient(explained, sample, t, alphas[i], values, abduction.cfg_scale)
            else:
                eps = self.predict_noise(sample, t, values, abduction.cfg_scale)
                if explained_scale is not None:
                    gradient = self.explained_gradient(explained, sample, t, alphas[i], values, eps=eps)[1]
            if explained_scale is not None:
                eps = eps - math.sqrt(1 - alphas[i]) * explained_scale.view(-1, 1, 1, 1) * gradient
            if guided:
                eps = eps - math.sqrt(1 - alphas[i]) * self.log_likelihood_gradient(sample, t, values, guided)
            sample = self.scheduler.step(eps, t, sample, eta=float(eta), generator=generator).prev_sample
            if callback_on_step_end is not None:
                callback_kwargs = {name: {"sample": sample}[name] for name in callback_on_step_end_tensor_inputs}
                sample = callback_on_step_end(self, i, t, callback_kwargs).pop("sample", sample)

        _check_finite(sample, "The counterfactual", scales | {"cfg": abduction.cfg_scale})
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
        guidance_scale: ScaleInput | None = None,
        cfg_scale: ScaleInput | None = None,
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
        classifier: torch.nn.Module | None = None,
        classifier_processor=None,
        classifier_gradient: str = "cheap",
    ) -> DiffSCMPipelineOutput | tuple:
        r"""
        The counterfactual "had `intervention` held": abduction, action on the causal graph, prediction.

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
            guidance_scale: anti-causal guidance s, or `{parent: s}`; defaults to the checkpoint's measured choice.
            cfg_scale: classifier-free guidance w, or `{parent: w}` (conditional mechanism); the checkpoint's default.
            num_inference_steps: DDIM steps each way (abduction and intervention).
            strength: fraction of the chain that is inverted and regenerated (1 = the whole chain).
            abduction_refinement_steps: extra UNet passes per inversion step for exact abduction.
            eta, generator: stochastic DDIM (eta > 0) with reproducible noise; eta = 0 is deterministic.
            output_type: `"pil"`, `"np"` or `"pt"`.
            return_reconstruction: also run the null intervention and return it.
            return_noise: also return the abducted noise.
            return_dict: return a [`DiffSCMPipelineOutput`] rather than a tuple of its fields, in their order.
            classifier, classifier_processor, classifier_gradient: explain a clean image classifier (e.g. a
                transformers `AutoModelForImageClassification`) instead of guiding with the noise-aware predictor:
                "what would this input need to look like for the classifier to say `target`?" (see [`intervene`]);
                `target_probabilities` are then the explained classifier's.

        Returns:
            [`DiffSCMPipelineOutput`] or a tuple of its nine fields (None where not asked for).

        Examples:
        ```py
        >>> from diffscm import DiffSCMPipeline
        >>> pipe = DiffSCMPipeline.from_pretrained("checkpoints/diffscm-mnist")
        >>> out = pipe(image, target=3)  # "what would this digit look like had it been a 3?"
        >>> pipe = DiffSCMPipeline.from_pretrained("checkpoints/diffscm-morphomnist-conditional")
        >>> out = pipe(image, intervention={"thickness": 4.0})  # intensity follows thickness through its mechanism
        >>> out.images[0].save("counterfactual.png"), out.counterfactual_values
        >>> from transformers import AutoImageProcessor, AutoModelForImageClassification
        >>> vit = AutoModelForImageClassification.from_pretrained("checkpoints/mnist-vit-classifier")
        >>> processor = AutoImageProcessor.from_pretrained("checkpoints/mnist-vit-classifier")
        >>> out = pipe(image, target=3, classifier=vit, classifier_processor=processor)  # explain the ViT
        ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if (target is None) == (intervention is None):
            raise ValueError("Give either `target` or `intervention` (a dict of variable values).")
        explained = self.explained_classifier(classifier, classifier_processor, classifier_gradient)
        self.guidance_scales(guidance_scale, explained=explained is not None)
        cfg_scales = self.cfg_scales(cfg_scale)
        _check_eta(eta)
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
        counterfactual = self.causal_graph.counterfactual(factual_repeated, intervention)

        # 1. Abduction: u = DDIM^-1(x_0) once per factual image, under its factual parents.
        parents = self.causal_graph.image_parents
        abduction = self.invert(
            sample, {name: factual[name] for name in parents}, num_inference_steps, strength,
            abduction_refinement_steps, cfg_scales,
        )  # fmt: skip

        # 2. Action: do(intervention) on the graph, descendants recomputed from their abducted noise (above).
        # 3. Prediction: DDIM from the same u under the counterfactual values of the image's parents.
        counterfactuals = self.intervene(
            abduction.repeat_interleave(num_targets),
            {name: counterfactual[name] for name in parents},
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            output_type="latent",
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            classifier=explained,
            classifier_gradient=classifier_gradient,
        )
        reconstructions = None
        if return_reconstruction:
            reconstructions = self.intervene(abduction, None, output_type=output_type)

        clean = counterfactuals.clamp(-1, 1)
        output = DiffSCMPipelineOutput(
            images=self.image_processor.postprocess(counterfactuals, output_type=output_type),
            counterfactual_values=counterfactual,
            factual_values=factual,
            predicted_factuals=predicted,
            predicted_values=self.read_parents(clean),
            reconstructions=reconstructions,
            noise=abduction.noise if return_noise else None,
        )
        if target is not None:
            output.targets = targets.flatten().numpy()
            if explained is not None:
                with torch.no_grad():
                    log_prob = explained.log_prob(clean, targets.flatten().to(clean.device))
                output.target_probabilities = log_prob.exp().cpu().numpy()
            elif self.classifier is not None:
                output.target_probabilities = self.target_probabilities(clean, targets.flatten()).cpu().numpy()
        self.maybe_free_model_hooks()
        return output if return_dict else tuple(getattr(output, name) for name in output.__dataclass_fields__)

    def read_parents(self, sample: torch.Tensor) -> dict[str, np.ndarray]:
        """The anti-causal predictor's point estimates of the image's parents from clean samples (empty without)."""
        if self.classifier is None:
            return {}
        estimates = self.classifier.predict(sample.to(self.classifier.dtype), 0)
        return {name: value.detach().cpu().numpy() for name, value in estimates.items()}

    def infer_factual_values(self, sample: torch.Tensor, given: ValuesInput | None) -> tuple[dict, list[str]]:
        """Factual values: those `given`, and the image's parents not given predicted from the clean image by the
        anti-causal predictor (conditions from the given values). Returns the values and the predicted names."""
        graph, size = self.causal_graph, sample.shape[0]
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"`factual_values` must be a dict {{variable: value}}, got {given!r}.")
        values = {name: self._per_image(name, value, size) for name, value in (given or {}).items()}
        predicted = [name for name in graph.image_parents if name not in values]
        if predicted and self.classifier is None:
            raise ValueError(
                f"This pipeline has no anti-causal predictor to read {predicted} from the image: give them in "
                "`factual_values`."
            )
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

    def guidance_scales(self, guidance_scale: ScaleInput | None = None, explained: bool = False) -> dict[str, float]:
        """The anti-causal guidance scale of every parent of the image: the given one(s) over the defaults; with an
        `explained` classifier, that of the categorical parent guides through it."""
        parents = self.causal_graph.image_parents
        scales = _per_parent("guidance_scale", parents, self.config.guidance_scale, guidance_scale, fill=0.0)
        unguided = {k: v for k, v in scales.items() if not (explained and k == self.single_categorical_parent())}
        if self.classifier is None and any(unguided.values()):
            raise ValueError("This pipeline has no anti-causal predictor: `guidance_scale` must be 0.")
        return scales

    def cfg_scales(self, cfg_scale: ScaleInput | None = None) -> dict[str, float]:
        """The classifier-free guidance scale of every parent of the image: the given one(s) over the defaults."""
        scales = _per_parent("cfg_scale", self.causal_graph.image_parents, self.config.cfg_scale, cfg_scale, fill=1.0)
        if self.parent_embedding is None and any(scale != 1 for scale in scales.values()):
            raise ValueError("`cfg_scale` needs a conditional mechanism (a `parent_embedding`); this one has none.")
        return scales

    def get_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> tuple[list[int], list[float]]:
        """The generation timesteps (descending) and alpha-bar before each step and after the last one."""
        train_steps = self.scheduler.config.num_train_timesteps
        num_inference_steps = _check_count("num_inference_steps", num_inference_steps, None)
        if not num_inference_steps <= train_steps:
            raise ValueError(f"`num_inference_steps` must be at most {train_steps}, got {num_inference_steps}.")
        if not _is_real(strength) or not 0 < strength <= 1:
            raise ValueError(f"`strength` must be a number in (0, 1], got {strength!r}.")
        self.scheduler.set_timesteps(num_inference_steps)
        num_steps = max(1, round(num_inference_steps * float(strength)))
        timesteps = self.scheduler.timesteps[-num_steps:].tolist()
        alphas = self.scheduler.alphas_cumprod[timesteps].tolist()
        return timesteps, alphas + [float(self.scheduler.final_alpha_cumprod)]

    def predict_noise(
        self, sample: torch.Tensor, timestep: int, parents: dict[str, torch.Tensor], cfg_scales: dict[str, float]
    ) -> torch.Tensor:
        """eps_theta(x_t, t) in float32 whatever the UNet's dtype; for a conditional mechanism eps_theta(x_t, t, pa)
        with per-parent classifier-free guidance, all its passes in one batched UNet call."""
        if self.parent_embedding is None:
            return self.unet(sample.to(self.unet.dtype), timestep).sample.float()
        dropped = [{}] + [{name: True} for name, scale in cfg_scales.items() if scale != 1]
        labels = torch.cat([self.parent_embedding(parents, drop) for drop in dropped])
        batch = sample.to(self.unet.dtype).repeat(len(dropped), 1, 1, 1)
        conditional, *without = self.unet(batch, timestep, class_labels=labels).sample.float().chunk(len(dropped))
        guided = [name for name, scale in cfg_scales.items() if scale != 1]
        return conditional + sum((cfg_scales[n] - 1) * (conditional - e) for n, e in zip(guided, without, strict=True))

    def explained_classifier(self, classifier, processor=None, gradient: str = "cheap") -> ExplainedClassifier | None:
        """The classifier to explain, wrapped with its processor (None: the noise-aware predictor guides)."""
        if gradient not in ("cheap", "full"):
            raise ValueError(f"`classifier_gradient` must be 'cheap' or 'full', got {gradient!r}.")
        if classifier is None or isinstance(classifier, ExplainedClassifier):
            return classifier
        self.single_categorical_parent()  # explanations name a class of the image's one categorical parent
        return ExplainedClassifier(classifier, processor).to(self._execution_device)

    def explained_gradient(
        self, explained, sample, timestep, alpha: float, values: dict, cfg_scales: dict | None = None, eps=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, the guidance gradient of a clean classifier): grad_{x_t} log p(target | x0_hat(x_t)), averaged over
        random views of x0_hat, weighted by sqrt(alpha_bar_t / (1 - alpha_bar_t)): the plain gradient explodes at high
        noise, where x0_hat divides by sqrt(alpha_bar_t) ~ 0.006 (measured on MNIST: images destroyed, L1 > 100 grey
        levels at scale 2), and the signal-to-noise ratio itself leaves only adversarial detail changes near the end.
        With `eps` given, x0_hat's noise estimate is held constant; without, the gradient runs through the UNet."""
        target = values[self.single_categorical_parent()]
        with torch.enable_grad():
            sample = sample.detach().requires_grad_(True)
            if eps is None:
                eps = self.predict_noise(sample, timestep, values, cfg_scales)
            denoised = (sample - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
            log_prob = explained.robust_log_prob(denoised, target).sum()
            gradient = torch.autograd.grad(log_prob, sample)[0]
        return eps.detach(), gradient.float() * math.sqrt(alpha / (1 - alpha))

    def log_likelihood_gradient(
        self, sample: torch.Tensor, timestep: int, values: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """grad_{x_t} sum_k s_k log p_phi(pa_k = values[k] | x_t, t), with a scale per parent and sample; the
        gradient flows through the predictor only."""
        with torch.enable_grad():
            sample = sample.detach().to(self.classifier.dtype).requires_grad_(True)
            log_likelihoods = self.classifier.log_likelihood(sample, timestep, values)
            total = sum((scale.to(sample.device) * log_likelihoods[name]).sum() for name, scale in scales.items())
            return torch.autograd.grad(total, sample)[0].float()

    def target_probabilities(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """p_phi(target | x_0) of clean samples in [-1, 1], for the image's single categorical parent."""
        parent = self.single_categorical_parent()
        sample = sample.clamp(-1, 1).to(self.classifier.dtype)
        return self.classifier.log_likelihood(sample, 0, {parent: target.to(sample.device)})[parent].exp()

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
                raise ValueError(
                    "`intervene` takes one target per sample; `Abduction.repeat_interleave` gives several."
                )
            target = {self.single_categorical_parent(): targets[:, 0]}
        if set(target) != set(parents):
            raise ValueError(
                f"The values of all the image's parents {list(parents)} are needed, got {sorted(target)}."
            )
        return {
            name: torch.as_tensor(self._per_image(name, value, batch_size), device=self._execution_device)
            for name, value in target.items()
        }

    def check_noise(self, noise: torch.Tensor):
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape[1:]) != (channels, size, size):
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"`noise` must be a tensor (B, {channels}, {size}, {size}) from `abduct`; got {shape}.")
        if not torch.isfinite(noise).all():
            raise ValueError("`noise` contains NaN or infinite values.")


def write_remote_code(pipe: DiffSCMPipeline, folder: str | os.PathLike):
    """The modules behind `pipe` as flat files of `folder` (and of each custom component's sub-folder), their
    `diffscm.*` imports made relative, and `model_index.json` pointing at them."""
    folder = Path(folder)
    imported = (preprocess_images, CausalGraph, AntiCausalClassifier, ParentEmbedding, ExplainedClassifier)
    modules = {sys.modules[__name__]} | {sys.modules[thing.__module__] for thing in imported}
    custom = {name: type(pipe.components[name]) for name in pipe._optional_components if pipe.components[name]}
    sources = {_module_file(module): _relative_imports(inspect.getsource(module)) for module in modules}
    for name, source in sources.items():
        (folder / name).write_text(source, encoding="utf-8")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    index["_class_name"] = [_module_file(sys.modules[__name__]).removesuffix(".py"), type(pipe).__name__]
    for name, cls in custom.items():
        module_file = _module_file(sys.modules[cls.__module__])
        (folder / name / module_file).write_text(sources[module_file], encoding="utf-8")
        index[name] = [module_file.removesuffix(".py"), cls.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _module_file(module) -> str:
    return module.__name__.rsplit(".", 1)[-1] + ".py"


def _relative_imports(source: str) -> str:
    """`from diffscm.models.anticausal import X` -> `from .anticausal import X`: the shipped files lie side by side."""
    return re.sub(r"^from diffscm(?:\.\w+)*\.(\w+) import", r"from .\1 import", source, flags=re.MULTILINE)


def _check_components(unet: UNet2DModel, scheduler: DDIMScheduler, classifier, parent_embedding, graph: CausalGraph):
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"Only epsilon-prediction UNets are supported, got {scheduler.config.prediction_type!r}.")
    conditional = unet.config.class_embed_type == "identity"
    if conditional != (parent_embedding is not None):
        raise ValueError(
            "A conditional mechanism needs both a UNet with class_embed_type='identity' and a `parent_embedding`; "
            f"got class_embed_type {unet.config.class_embed_type!r} and "
            f"{'a' if parent_embedding is not None else 'no'} parent embedding."
        )
    if parent_embedding is not None:
        width = unet.time_embedding.linear_2.out_features
        if parent_embedding.config.embedding_dim != width:
            raise ValueError(
                f"The parent embedding is {parent_embedding.config.embedding_dim} wide; the UNet's timestep "
                f"embedding is {width}."
            )
        if parent_embedding.parents != graph.parent_specs():
            raise ValueError(
                f"The parent embedding embeds {parent_embedding.parents}, but the image's parents in the causal "
                f"graph are {graph.parent_specs()}."
            )
    if classifier is None:
        return
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
    first = name_or_path.split("/")[0]
    if (
        os.path.exists(name_or_path)
        or name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or ("/" in name_or_path and os.path.isdir(first))
    ):
        raise FileNotFoundError(f"No such pipeline folder: {name_or_path!r}.")
    try:
        return snapshot_download(name_or_path, **download)
    except Exception as error:  # the hub client raises many kinds; all mean the same to the user
        raise OSError(
            f"{name_or_path!r} is not a local folder, and as a Hub id it could not be fetched: {error}"
        ) from error


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
    missing = {"unet", "scheduler"} - set(config)
    if class_name != DiffSCMPipeline.__name__ or missing:
        raise ValueError(f"{folder} holds a {class_name} pipeline, not a DiffSCMPipeline (with unet and scheduler).")
    predictor = (config.get("classifier") or [None, None])[-1]
    if predictor is not None and predictor not in PREDICTORS:
        raise ValueError(f"{path}: unknown anti-causal predictor {predictor!r}; expected one of {sorted(PREDICTORS)}.")
    for name in ("classifier", "parent_embedding"):
        recorded = (config.get(name) or [None, None])[-1]
        if recorded is not None and not os.path.isdir(os.path.join(folder, name)):
            raise ValueError(f"{folder} records a {name} ({recorded}) but has no {name}/ folder.")
    return config


def _load_component(folder: str, name: str, load: Callable):
    """One component, with an error that names its folder and file when its weights are missing or broken."""
    subfolder = Path(folder) / name
    weights = sorted(subfolder.glob("*.safetensors")) + sorted(subfolder.glob("*.bin"))
    if name != "scheduler" and not weights:
        raise ValueError(f"{subfolder} has no weights (diffusion_pytorch_model.safetensors is missing).")
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        shown = weights[0] if weights else subfolder / "scheduler_config.json"
        raise ValueError(f"Cannot load the {name} from {shown}: {error}") from error


def _is_real(value) -> bool:
    """A real number (Python, numpy or a 0-d tensor), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _check_count(name: str, value, default, minimum: int = 1) -> int:
    """An integer setting (Python, numpy or 0-d tensor) >= `minimum`; `default` when None."""
    value = default if value is None else value
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_eta(eta):
    if not _is_real(eta) or not 0 <= float(eta) <= 1:
        raise ValueError(f"`eta` must be a number in [0, 1], got {eta!r}.")


def _per_parent(
    name: str, parents: tuple[str, ...], default: ScaleInput, given: ScaleInput | None, fill: float
) -> dict[str, float]:
    """{parent: scale} from a scale or a per-parent dict, the given one(s) over the defaults (`fill` for parents
    named by neither); finite and >= 0."""
    scales = {}
    for scale in (default, given):
        if scale is None:
            continue
        if not isinstance(scale, dict):
            scale = dict.fromkeys(parents, scale)
        unknown = set(scale) - set(parents)
        if unknown:
            raise ValueError(f"`{name}` names {sorted(unknown)}, not parents of the image {list(parents)}.")
        for parent, value in scale.items():
            if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0 (or one per parent), got {value!r}.")
            scales[parent] = float(value)
    return {parent: scales.get(parent, fill) for parent in parents}


def _check_finite(sample: torch.Tensor, what: str, scales: dict):
    if not torch.isfinite(sample).all():
        raise ValueError(f"{what} became NaN or infinite: the guidance is too strong ({scales}); lower it.")


def _is_all(target) -> bool:
    return isinstance(target, str) and target == "all"
