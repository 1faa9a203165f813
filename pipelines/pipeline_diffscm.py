"""Diff-SCM (Sanchez & Tsaftaris, CLeaR 2022): counterfactual images by DDIM abduction and intervention."""

import math
import os
import tempfile
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ModelMixin, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from diffscm.flows import fit as _flows  # noqa: F401  (scm's flow mechanism: remote code copies direct imports only)
from diffscm.folder_format import (
    DEFAULTS,
    INTEGRATORS,
    SETTINGS,
    copy_records,
    default_guidance_scale,
    read_index,
    upload,
)
from diffscm.folder_format import causal_graph as folder_causal_graph
from diffscm.image_processing import PipelineImageInput, preprocess_images
from diffscm.models.anticausal import AntiCausalClassifier, AntiCausalPredictor  # noqa: F401  (remote code copies direct imports)
from diffscm.models.colour_map import ParentColourMap  # noqa: F401  (remote code copies direct imports)
from diffscm.models.explained_classifier import ExplainedClassifier
from diffscm.models.parent_embedding import ParentEmbedding  # noqa: F401  (remote code copies direct imports)
from diffscm.models.semantic_encoder import SemanticEncoder  # noqa: F401  (remote code copies direct imports)
from diffscm.scm import CausalGraph

from .checks import (
    ScaleInput,
    check_callback,
    check_components,
    check_count,
    check_eta,
    check_finite,
    check_generator,
    check_noise,
    check_output_type,
    check_residuals,
    check_scale,
    check_semantic_latent,
    check_strength,
    explained_keywords,
    renamed_keyword,
)
from .fixed_point import anderson_mix
from .folder import load_components, loading_options, resolve, staged_save, write_model_card, write_remote_code
from .guides import AntiCausalGuide, ExplainedClassifierGuide, Guide, check_guides
from .parent_values import ParentValuesMixin, TargetInput, ValuesInput
from .pipeline_output import Abduction, Chain, DiffSCMPipelineOutput, Guidance


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float, eta=0.0, generator=None):
    """DDIM move from alpha-bar `alpha_from` to `alpha_to` (Song et al. 2021, eq. 12), the one step function of both
    directions: with eta = 0 it is deterministic and its own inverse when the two alphas are swapped; eta > 0 (from
    less to more signal only) adds fresh noise from `generator`."""
    pred_original = (sample - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    sigma = eta * math.sqrt((1 - alpha_to) / (1 - alpha_from) * (1 - alpha_from / alpha_to)) if eta else 0.0
    moved = math.sqrt(alpha_to) * pred_original + math.sqrt(1 - alpha_to - sigma**2) * eps
    if sigma:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        moved = moved + sigma * noise
    return moved


def fixed_point_passes(integrator: str, refinements: int, first: bool) -> int:
    """UNet passes of one abduction step's fixed-point iteration: 1 + K for DDIM; K for the residual integrator,
    whose step starts from the noise of the state below (at least 1 on the first step, where no noise is known)."""
    if integrator == "residual":
        return max(refinements, 1) if first else refinements
    return 1 + refinements


def bdia_step(
    sample: torch.Tensor, other: torch.Tensor, eps: torch.Tensor, alpha_other: float, alpha: float, alpha_to
):
    """BDIA-DDIM (Zhang et al., ECCV 2024, gamma = 1): from the states at `alpha` (`sample`, whose `eps` this is) and
    at `alpha_other` on its other side, the state at `alpha_to`: other - DDIM(sample -> alpha_other) + DDIM(sample ->
    alpha_to). With the two outer alphas swapped it is its own exact inverse, both ways at one noise estimate."""
    return other - ddim_step(sample, eps, alpha, alpha_other) + ddim_step(sample, eps, alpha, alpha_to)


class DiffSCMPipeline(ParentValuesMixin, DiffusionPipeline):
    r"""
    Counterfactual image generation with a diffusion model as the image's causal mechanism (Diff-SCM).

    1. Abduction: deterministic DDIM inversion of the factual image x_0 to its exogenous noise u = x_T, and the noise
       of every other variable of the causal graph through the inverse of its mechanism.
    2. Action: do(variable = value); descendants follow through their mechanisms with their abducted noise.
    3. Prediction: DDIM from u back to x_0 under the counterfactual values pa* of the image's parents.

    The image's mechanism (`pipe.mechanism`) is **classifier-guided** (the paper's: an unconditional eps_theta(x_t, t)
    steered by the noise-aware anti-causal predictors, eps - sqrt(1 - alpha_bar_t) sum_k s_k grad log p(pa_k* | x_t))
    or **conditional** (eps_theta(x_t, t, pa), x = f(pa, u) itself, with classifier-free guidance per parent, the same
    both ways; anti-causal guidance may act on top). Anti-causal guidance acts on no sample left unchanged, so that
    do(parents = factual values) returns the input, and on every parent of an intervened one, towards their
    counterfactual values: it holds the unchanged parents too. A conditional mechanism takes its parents itself, so
    with `hold_unchanged_parents=False` it guides only the parents that change.

    Parameters:
        unet ([`UNet2DModel`]): eps_theta (epsilon prediction); `class_embed_type="identity"` when conditional.
        scheduler ([`DDIMScheduler`]): its noise schedule; any scheduler config is read as a DDIM one.
        classifier ([`AntiCausalClassifier`] or [`AntiCausalPredictor`], *optional* when conditional): noise-aware
            predictors of the image's parents on the same schedule; they guide and read factual values not given.
        parent_embedding ([`ParentEmbedding`], *optional*): the parents as the UNet's class conditioning.
        semantic_encoder ([`SemanticEncoder`], *optional*, conditional only): semantic abduction, z = e(x) read from
            the factual image and added to the parents' conditioning both ways (z ~ N(0, I) for `generate`).
        colour_map ([`ParentColourMap`], *optional*, conditional only): the parents that act on the image only through
            its colours, a colour matrix x = A(c) y per pixel; the UNet draws y with those parents at their reference
            values, abduction maps the factual image there and prediction back under the counterfactual values, and the
            guides and callbacks see the image at the reference colour.
        causal_graph (`dict`): the [`~diffscm.scm.CausalGraph`] config (default: one categorical parent -> image).
        guidance_scale, cfg_scale (`float` or `{parent: float}`), num_inference_steps, abduction_refinement_steps,
            explained_classifier_scale: the defaults of every call (anti-causal s: 1 with a predictor, else 0).
        hold_unchanged_parents (`bool`): a conditional mechanism's anti-causal guidance also holds the parents that
            an intervention leaves unchanged (a classifier-guided mechanism's always does); False guides only the
            parents that change.
    """

    model_cpu_offload_seq = "classifier->colour_map->semantic_encoder->parent_embedding->unet"
    _optional_components = ["classifier", "parent_embedding", "semantic_encoder", "colour_map"]
    _callback_tensor_inputs = ["sample"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        classifier: ModelMixin | None = None,  # ModelMixin: plain diffusers loads a component's remote code twice
        parent_embedding: ModelMixin | None = None,
        semantic_encoder: ModelMixin | None = None,
        colour_map: ModelMixin | None = None,
        causal_graph: dict | None = None,
        guidance_scale: ScaleInput | None = None,
        cfg_scale: ScaleInput = DEFAULTS["cfg_scale"],
        num_inference_steps: int = DEFAULTS["num_inference_steps"],
        abduction_refinement_steps: int = DEFAULTS["abduction_refinement_steps"],
        explained_classifier_scale: float = DEFAULTS["explained_classifier_scale"],
        integrator: str = DEFAULTS["integrator"],
        hold_unchanged_parents: bool = DEFAULTS["hold_unchanged_parents"],
    ):
        super().__init__()
        if guidance_scale is None:
            guidance_scale = default_guidance_scale(classifier is not None)
        if not isinstance(scheduler, DDIMScheduler) or scheduler.config.clip_sample or scheduler.config.thresholding:
            # DDIM (abduction inverts it), never clipped: a clipped step cannot be inverted.
            scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)
        self.causal_graph = pipeline_causal_graph(causal_graph, classifier, parent_embedding)
        check_components(
            unet, scheduler, classifier, parent_embedding, self.causal_graph, semantic_encoder, colour_map
        )
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            classifier=classifier,
            parent_embedding=parent_embedding,
            semantic_encoder=semantic_encoder,
            colour_map=colour_map,
        )
        self.register_to_config(
            causal_graph=self.causal_graph.to_config(),
            guidance_scale=guidance_scale,
            cfg_scale=cfg_scale,
            num_inference_steps=num_inference_steps,
            abduction_refinement_steps=abduction_refinement_steps,
            explained_classifier_scale=explained_classifier_scale,
            integrator=integrator,
            hold_unchanged_parents=hold_unchanged_parents,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)
        self.guidance_scales(guidance_scale)
        self.cfg_scales(cfg_scale)
        check_scale("explained_classifier_scale", explained_classifier_scale)
        self.check_integrator(integrator)
        if not isinstance(hold_unchanged_parents, bool):
            raise ValueError(f"`hold_unchanged_parents` must be True or False, got {hold_unchanged_parents!r}.")
        self._interrupt, self._num_timesteps = False, 0

    @property
    def mechanism(self) -> str:
        """`"conditional"` (eps_theta(x_t, t, pa)) or `"classifier-guided"` (eps_theta(x_t, t) and p_phi)."""
        return "conditional" if self.parent_embedding is not None else "classifier-guided"

    @property
    def num_timesteps(self) -> int:
        """DDIM steps of the current (or last) prediction."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set by a callback to stop the prediction after the current step (the sample so far is returned)."""
        return self._interrupt

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiffSCMPipeline":
        """Load a DiffSCMPipeline folder or Hub id ([`~diffscm.pipelines.folder`]). `torch_dtype` / `dtype`: a dtype,
        its name or `{component: dtype, "default": dtype}` (the chain's states stay in [`state_dtype`]); diffusers'
        download and loading keywords as in diffusers; any other keyword overrides a recorded setting or a
        component."""
        download, model_options, dtype = loading_options(kwargs)
        path = resolve(str(pretrained_model_name_or_path), **download)
        index = read_index(path)
        components = load_components(path, index, dtype, skip=kwargs, **model_options)
        settings = {key: index[key] for key in SETTINGS if key in index}
        pipe = cls(**(settings | components | kwargs))
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """diffusers' `save_pretrained`, plus the code plain diffusers needs (`trust_remote_code=True`) and the
        project's model card, rendered from the folder's files; `push_to_hub=True` uploads it (`repo_id`, `token`).
        The save is atomic and replaces a pipeline folder whole ([`staged_save`]): a folder re-saved in place keeps
        its `training.json` and `evaluation.md`, another pipeline's are not carried over."""
        hub_options = {key: kwargs.pop(key) for key in ("repo_id", "token", "private") if key in kwargs}

        def write(staging):
            super(DiffSCMPipeline, self).save_pretrained(staging, **kwargs)
            write_remote_code(self, staging)

        staged_save(save_directory, self.config.get("_name_or_path", ""), write)
        if push_to_hub:  # the same upload as `push_to_hub`, records of the folder it was loaded from included
            repo_id = hub_options.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            self.push_to_hub(repo_id, **hub_options)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> str:
        """Upload the pipeline to the Hub repo `repo_id` with its code and the project's model card (diffusers' own
        upload would write its generic card), keeping the `training.json` and `evaluation.md` of the folder it was
        loaded from; returns the repo URL. diffusers' keywords, but weights go as safetensors without a variant."""
        if not safe_serialization or variant is not None:
            raise ValueError("A DiffSCMPipeline is uploaded as plain safetensors weights (no pickles, no variant).")
        with tempfile.TemporaryDirectory(prefix="diffscm-push-") as staging:
            self.save_pretrained(staging)
            copy_records(self.config.get("_name_or_path", ""), staging)
            write_model_card(staging, repo_id=repo_id)
            options = {"token": token, "private": bool(private), "commit_message": commit_message}
            return upload(staging, repo_id, create_pr=create_pr, **options)

    @torch.no_grad()
    def abduct(
        self,
        image: PipelineImageInput,
        factual_values: ValuesInput | None = None,
        *,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        abduction_refinement_steps: int | None = None,
        cfg_scale: ScaleInput | None = None,
        integrator: str | None = None,
    ) -> Abduction:
        """
        Abduction: the exogenous noise u of each factual image by deterministic DDIM inversion (fp32, no clipping).

        Args:
            image: the factual image(s), as for `__call__`.
            factual_values: the parents' values, those not given read by the anti-causal predictor at t = 0.
            num_inference_steps: DDIM steps of the whole chain (default: the config's).
            strength: the fraction of the chain inverted (the official Diff-SCM code used 0.75).
            abduction_refinement_steps: K extra UNet passes per step, solving x_t = step^-1(x_next, eps(x_t, t)) by
                Anderson-accelerated fixed-point iteration, so that the generation step from x_t lands back on x_next.
            cfg_scale: classifier-free guidance per parent, kept for the prediction.
            integrator: "ddim" (with the refinement above); "bdia", BDIA-DDIM (Zhang et al. 2024), exactly
                invertible at one UNet pass per step; or "residual": DDIM inversion (refined K times) that also
                records each step's residual, the gap between the abducted state below and the DDIM step down to it,
                which the prediction adds back (one more UNet pass per step, which also starts the next step: N + 1
                passes in all at K = 0).
                With either of the last two the null intervention returns the input to float error.

        Returns:
            The [`Abduction`] that [`intervene`] follows.
        """
        sample = self.preprocess(image)
        chain = self.get_chain(num_inference_steps, strength)
        integrator = self.check_integrator(integrator, chain)
        refinements = self.refinement_steps(abduction_refinement_steps)
        cfg_scales = self.cfg_scales(cfg_scale)
        factual, _ = self.infer_factual_values(sample, factual_values)
        return self._invert(sample, factual, chain, refinements, cfg_scales, integrator)

    def preprocess(self, image: PipelineImageInput) -> torch.Tensor:
        """Factual image(s) as a float32 `(B, C, H, W)` tensor in [-1, 1] of the model's size, on its device."""
        sample = preprocess_images(image, *self.unet_sample_shape)
        return sample.to(self._execution_device)

    def check_integrator(self, integrator: str | None = None, chain: Chain | None = None, eta: float = 0.0) -> str:
        """The checked integrator (default: the config's): BDIA needs two steps or more; BDIA and the residual
        integrator are deterministic."""
        integrator = self.config.integrator if integrator is None else integrator
        if integrator not in INTEGRATORS:
            raise ValueError(f"`integrator` must be one of {INTEGRATORS}, got {integrator!r}.")
        if integrator == "bdia" and chain is not None and len(chain) < 2:
            raise ValueError("The BDIA integrator needs at least 2 steps (num_inference_steps x strength).")
        if integrator != "ddim" and eta:
            raise ValueError(f"The {integrator!r} integrator is deterministic: `eta` must be 0.")
        return integrator

    def refinement_steps(self, abduction_refinement_steps: int | None) -> int:
        """The checked number of fixed-point refinements per abduction step (default: the config's)."""
        default = self.config.abduction_refinement_steps
        return check_count("abduction_refinement_steps", abduction_refinement_steps, default, 0)

    def _invert(
        self,
        sample: torch.Tensor,
        factual: dict,
        chain: Chain,
        refinements: int,
        cfg_scales: dict[str, float],
        integrator: str = "ddim",
    ) -> Abduction:
        """The inversion of [`abduct`] from checked values: a preprocessed `sample` in [-1, 1], the factual values (of
        every parent of the image, one per sample), and the prediction's chain, walked backwards. DDIM: each step the
        fixed point of x_t = step^-1(x_next, eps(x_t, t)). BDIA: the first step as DDIM, then each state from the two
        below it at one noise estimate, exactly what the prediction undoes. Residual: each step from the noise of the
        state below (refined K times), then the residual x_next - DDIM(x_t -> x_next) at the noise of the state
        reached, which is also where the next step starts."""
        factual_parents = self.parent_tensors(factual)
        parents = self.reference_colour_values(factual_parents)  # the values the UNet draws the image under
        sample = self.to_reference_colour(sample.to(self.state_dtype), factual_parents)
        latent, alphas = self.semantic_latent(sample), chain.alphas
        eps, below = torch.zeros_like(sample), None  # each step starts from the previous step's noise estimate
        residuals = [None] * len(chain) if integrator == "residual" else None
        for k in self.progress_bar(range(len(chain) - 1, -1, -1)):  # x at alphas[k + 1] -> x at alphas[k]
            t, alpha_t, alpha_next = chain[k]
            if integrator == "bdia" and below is not None:
                eps = self.predict_noise(sample, chain[k + 1][0], parents, cfg_scales, latent)
                sample, below = bdia_step(sample, below, eps, alphas[k + 2], alpha_next, alpha_t), sample
                continue
            guess, tried, mapped = ddim_step(sample, eps, alpha_next, alpha_t), [], []
            for _ in range(fixed_point_passes(integrator, refinements, first=below is None)):
                eps = self.predict_noise(guess, t, parents, cfg_scales, latent)
                tried.append(guess), mapped.append(ddim_step(sample, eps, alpha_next, alpha_t))
                guess = anderson_mix(tried, mapped)
            if residuals is not None:  # the noise of the state reached, which the next step also starts from
                eps = self.predict_noise(guess, t, parents, cfg_scales, latent)
                residuals[k] = sample - ddim_step(guess, eps, alpha_t, alpha_next)
            sample, below = guess, sample
        check_finite(sample, "The abducted noise", cfg_scales)
        values = {name: value.cpu().numpy() for name, value in factual_parents.items()}
        previous = below if integrator == "bdia" else None
        return Abduction(
            noise=sample,
            factual_values=values,
            num_inference_steps=chain.num_inference_steps,
            strength=chain.strength,
            abduction_refinement_steps=refinements,
            cfg_scale=cfg_scales,
            chain=chain,
            integrator=integrator,
            previous=previous,
            residuals=None if residuals is None else torch.stack(residuals, dim=1),
            semantic_latent=latent,
        )

    @property
    def unet_sample_shape(self) -> tuple[int, int]:
        """The UNet's channels and square size."""
        return self.unet.config.in_channels, self.unet.config.sample_size

    @property
    def state_dtype(self) -> torch.dtype:
        """The integrators' arithmetic on x_t: float64 (float32 on MPS, which has none), so that BDIA's inverse holds
        to float64 error whatever the UNet's precision; the UNet and the guides see the state in float32. (In float32
        a rounding difference between the two directions flips a bfloat16 UNet's input rounding and grows: measured
        on the shipped MNIST pipeline in bfloat16, null L1 1.71 grey levels against 2e-14 in float64.)"""
        return torch.float32 if self._execution_device.type == "mps" else torch.float64

    def semantic_latent(self, sample: torch.Tensor) -> torch.Tensor | None:
        """Semantic abduction: the posterior mean of z for each factual image (None without a semantic encoder)."""
        return None if self.semantic_encoder is None else self.semantic_encoder(sample.float())[0].float()

    def reference_colour_values(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parents' values as the UNet and the guides see them: a colour map's parents at their reference."""
        if self.colour_map is None:
            return values
        reference = self.colour_map.config.reference
        return {name: torch.full_like(v, reference[name]) if name in reference else v for name, v in values.items()}

    def to_reference_colour(self, sample: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """A factual image under its parents' `values` -> at the colour map's reference colour (itself without one)."""
        return sample if self.colour_map is None else self.colour_map.to_reference(sample, values)

    def from_reference_colour(
        self, sample: torch.Tensor, values: dict[str, torch.Tensor], drawn: torch.Tensor | bool | None = None
    ) -> torch.Tensor:
        """The image at the reference colour -> under the parents' `values` (itself without a colour map). The
        samples that the diffusion drew anew (`drawn`: True, or a `(B, 1, 1, 1)` mask) are first clipped to the image
        range, since the colour map would carry their over- and undershoots (a little below black in one channel)
        into visible colours; the others come back exactly."""
        if self.colour_map is None:
            return sample
        if drawn is not None:
            sample = torch.where(torch.as_tensor(drawn, device=sample.device), sample.clamp(-1, 1), sample)
        return self.colour_map(sample, values)

    @torch.no_grad()
    def intervene(
        self,
        abduction: Abduction,
        parent_values: TargetInput | ValuesInput | None = None,
        *,
        guidance_scale: ScaleInput | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample",),
        explained_classifier: torch.nn.Module | None = None,
        explained_processor=None,
        explained_gradient: str = "cheap",
        guides: list[Guide] | None = None,
        **kwargs,
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """
        Prediction: DDIM from the abducted noise to x_0 on the abduction's chain, each step's noise estimate guided
        by [`guided_noise`].

        Args:
            abduction: what [`abduct`] returned.
            parent_values: every parent of the image, `{parent: value or one per sample}`, or a class for one
                categorical parent; None: the factual values.
            guidance_scale: anti-causal s, or `{parent: s}`; it acts only on samples whose parents change, towards
                all their counterfactual values (a conditional mechanism's with `hold_unchanged_parents=False`: only
                on the parents that change).
            eta, generator: eta > 0 with `generator`: stochastic DDIM.
            output_type: "pil", "np", "pt" or "latent" (the raw sample in [-1, 1]).
            callback_on_step_end, callback_on_step_end_tensor_inputs: a callback may replace `"sample"` or set
                `pipe._interrupt`.
            explained_classifier, explained_processor, explained_gradient: a clean classifier (e.g. a transformers
                `AutoModelForImageClassification`) that guides instead of the noise-aware predictor, its gradient
                "cheap" (x0_hat's noise held constant) or "full".
            guides: more [`~pipelines.guides.Guide`]s, each steering every sample.
        """
        parent_values = renamed_keyword(kwargs, "target", "parent_values", parent_values)
        explained, explained_gradient = self.explained_from(
            kwargs, explained_classifier, explained_processor, explained_gradient
        )
        if not isinstance(abduction, Abduction):
            raise TypeError(
                f"`intervene` takes the Abduction returned by `abduct` (it carries the chain's settings), got "
                f"{type(abduction).__name__}."
            )
        check_output_type(output_type)
        eta = check_eta(eta)
        check_callback(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        check_generator(generator, abduction.batch_size)
        for state in (abduction.noise, abduction.previous):
            if state is not None:
                check_noise(state, *self.unet_sample_shape)
        check_semantic_latent(abduction.semantic_latent, self.semantic_encoder, abduction.batch_size)
        chain = abduction.chain or self.get_chain(abduction.num_inference_steps, abduction.strength)
        integrator = self.check_integrator(abduction.integrator, chain, eta)
        check_residuals(abduction.residuals, integrator, abduction.batch_size, len(chain), *self.unet_sample_shape)
        scales = self.guidance_scales(guidance_scale, explained=explained is not None)
        factual = self.prepare_parent_values(abduction.factual_values, abduction.batch_size)
        values = factual if parent_values is None else self.prepare_parent_values(parent_values, abduction.batch_size)
        guidance = self.prepare_guidance(
            scales, abduction.cfg_scale, factual, values, explained, explained_gradient, check_guides(guides)
        )
        sample = self._predict(
            abduction.noise,
            chain,
            values,
            guidance,
            integrator,
            abduction.previous,
            eta,
            generator,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            abduction.semantic_latent,
            abduction.residuals,
        )
        return self.postprocess(sample, output_type)

    def _predict(
        self,
        noise: torch.Tensor,
        chain: Chain,
        values: dict[str, torch.Tensor],
        guidance: Guidance,
        integrator: str = "ddim",
        previous: torch.Tensor | None = None,
        eta: float = 0.0,
        generator=None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs=("sample",),
        latent: torch.Tensor | None = None,
        residuals: torch.Tensor | None = None,
        drawn: bool = False,
    ) -> torch.Tensor:
        """The prediction of [`intervene`] from checked values: down `chain` from `noise` under `values` (and the
        semantic `latent`, if any) by DDIM steps, then through the colour map, if any; with BDIA, the samples whose
        parents stay take BDIA's steps instead, the first landing on `previous` (the abducted state after u), so that
        they come back exactly, one UNet pass per step either way. Measured on the shipped MNIST pipeline, 64 held-out
        digits: BDIA steps for the changed samples too flipped 0.922 / 0.828 / 0.344 of them at 25 / 15 / 10 steps
        (their pair carries the factual trajectory), DDIM steps 1.000 at each. With the residual integrator every
        sample's DDIM step adds the abducted `residuals` of that step, so that those whose parents stay land on their
        abducted states. `drawn`: every sample is drawn anew (`generate`), not only those whose parents change."""
        sample, above = noise.to(self._execution_device, self.state_dtype), None
        colours, values = values, self.reference_colour_values(values)
        changed = guidance.changed.view(-1, 1, 1, 1) > 0 if guidance.any_changed else None
        self._num_timesteps, self._interrupt = len(chain), False
        for i, (t, alpha_t, alpha_next) in enumerate(self.progress_bar(chain.steps)):
            if self.interrupt:
                break
            if integrator == "bdia" and i == 0 and previous is not None and changed is None:
                sample, above = previous.to(sample), sample
                continue
            eps = self.guided_noise(sample, t, alpha_t, values, guidance, latent)
            moved = ddim_step(sample, eps, alpha_t, alpha_next, eta, generator)
            if residuals is not None:  # every sample: those whose parents stay land on their abducted states
                moved = moved + residuals[:, i].to(moved)
            if integrator == "bdia" and (i > 0 or previous is not None):  # the samples that stay come back exactly
                if i == 0:
                    stay = previous.to(moved)
                else:
                    stay = bdia_step(sample, above, eps, chain.alphas[i - 1], alpha_t, alpha_next)
                moved = stay if changed is None else torch.where(changed, moved, stay)
            sample, above = moved, sample
            if callback_on_step_end is not None:
                callback_kwargs = {name: {"sample": sample}[name] for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, callback_kwargs)
                if not isinstance(returned, dict):
                    raise TypeError(
                        f"`callback_on_step_end` must return a dict of tensors (callback_kwargs), got {returned!r}."
                    )
                sample = returned.pop("sample", sample)
        sample = self.from_reference_colour(sample, colours, True if drawn else changed)
        scales = {"guides": [type(guide).__name__ for guide in guidance.guides], "cfg": guidance.cfg_scale}
        check_finite(sample, "The counterfactual", scales, after_callback=callback_on_step_end is not None)
        return sample.float()

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
        explained_classifier: torch.nn.Module | None = None,
        explained_processor=None,
        explained_gradient: str = "cheap",
        guides: list[Guide] | None = None,
        integrator: str | None = None,
        **kwargs,
    ) -> DiffSCMPipelineOutput | tuple:
        r"""
        The counterfactual of `image` had `intervention` or `target` held: abduction, action and prediction.

        Args:
            image: PIL, numpy HWC or torch CHW in [0, 1], one or a list.
            target: the class of the image's one categorical parent: one, one per image, `(B, K)` or "all".
            intervention: `{variable: value or one per image}` (instead of `target`).
            factual_values: known values of the image's parents; the rest are read from the image.
            guidance_scale, cfg_scale: anti-causal and classifier-free guidance, one or `{parent: scale}`.
            num_inference_steps, strength, abduction_refinement_steps, integrator: the chain (see [`abduct`]).
            eta, generator, callback_on_step_end, callback_on_step_end_tensor_inputs, explained_classifier,
                explained_processor, explained_gradient, guides: as for [`intervene`].
            output_type: "pil", "np" or "pt".
            return_reconstruction, return_noise: also the null intervention's images, and the abducted noise.
            return_dict: a [`DiffSCMPipelineOutput`], else a tuple of its fields.

        Every setting not given is the config's.
        """
        sample = self.preprocess(image)
        explained, explained_gradient = self.explained_from(
            kwargs, explained_classifier, explained_processor, explained_gradient
        )
        intervention, targets = self.check_inputs(
            sample, target, intervention, eta, generator, output_type, callback_on_step_end_tensor_inputs
        )
        chain = self.get_chain(num_inference_steps, strength)
        integrator = self.check_integrator(integrator, chain, eta)
        refinements = self.refinement_steps(abduction_refinement_steps)
        cfg_scales = self.cfg_scales(cfg_scale)
        scales = self.guidance_scales(guidance_scale, explained=explained is not None)
        guides = check_guides(guides)
        factual, predicted = self.infer_factual_values(sample, factual_values)
        repeats = 1 if targets is None else targets.shape[1]
        # 1. Abduction: u = DDIM^-1(x_0) once per factual image, under its factual parents.
        abduction = self._invert(sample, factual, chain, refinements, cfg_scales, integrator)
        # 2. Action: do(intervention) on the graph, descendants recomputed from their abducted noise.
        counterfactual = self.act(factual, intervention, repeats)
        # 3. Prediction: DDIM from the same u under the counterfactual values of the image's parents.
        repeated = abduction.repeat_interleave(repeats)
        factual_parents, values = self.parent_tensors(repeated.factual_values), self.parent_tensors(counterfactual)
        guidance = self.prepare_guidance(
            scales, cfg_scales, factual_parents, values, explained, explained_gradient, guides
        )
        counterfactuals = self._predict(
            repeated.noise,
            chain,
            values,
            guidance,
            integrator,
            repeated.previous,
            eta,
            generator,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            repeated.semantic_latent,
            repeated.residuals,
        )
        if return_reconstruction:
            unchanged = self.parent_tensors(abduction.factual_values)
            reconstructions = self.postprocess(
                self._predict(
                    abduction.noise,
                    chain,
                    unchanged,
                    Guidance(cfg_scales),
                    integrator,
                    abduction.previous,
                    latent=abduction.semantic_latent,
                    residuals=abduction.residuals,
                ),
                output_type,
            )
        output = DiffSCMPipelineOutput(
            images=self.postprocess(counterfactuals, output_type),
            counterfactual_values=counterfactual,
            factual_values=factual,
            predicted_factuals=predicted,
            reconstructions=reconstructions if return_reconstruction else None,
            noise=abduction.noise if return_noise else None,
            **self.read_back(counterfactuals, targets, explained),
        )
        self.maybe_free_model_hooks()
        return output if return_dict else tuple(getattr(output, name) for name in output.__dataclass_fields__)

    def check_inputs(self, sample, target, intervention, eta, generator, output_type, callback_tensor_inputs):
        """The request of a `__call__` checked before the costly abduction; returns the intervention as
        `{variable: one value per counterfactual}` and, with `target=`, the `(B, K)` targets (else None)."""
        check_output_type(output_type)
        check_eta(eta)
        check_callback(callback_tensor_inputs, self._callback_tensor_inputs)
        if (target is None) == (intervention is None):
            raise ValueError("Give either `target` or `intervention` (a dict of variable values).")
        batch_size = sample.shape[0]
        if target is not None:
            targets = self.prepare_targets(target, batch_size)
            check_generator(generator, targets.numel())
            return {self.single_categorical_parent(): targets.flatten().numpy()}, targets
        if not isinstance(intervention, dict) or not intervention:
            raise ValueError(f"`intervention` must be a non-empty dict {{variable: value}}, got {intervention!r}.")
        check_generator(generator, batch_size)
        return {k: self._per_image(k, v, batch_size) for k, v in intervention.items()}, None

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """A sample in [-1, 1] as `output_type`: "latent" as it is, else diffusers' image postprocessing."""
        return sample if output_type == "latent" else self.image_processor.postprocess(sample, output_type)

    @torch.no_grad()
    def generate(
        self,
        parent_values: TargetInput | ValuesInput,
        num_images: int | None = None,
        *,
        num_inference_steps: int | None = None,
        cfg_scale: ScaleInput | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ):
        """
        The image mechanism alone, x = f(pa, u) from fresh noise u (no abduction, no anti-causal guidance): how well
        a conditional mechanism follows its parents.

        Args:
            parent_values: as for [`intervene`]; one image per sample.
            num_images: how many images (default: one per sample of `parent_values`).
            num_inference_steps, cfg_scale, generator, output_type: as for `__call__`.
        """
        check_output_type(output_type)
        given = parent_values.values() if isinstance(parent_values, dict) else [parent_values]
        sizes = [len(value) for value in given if np.ndim(value) > 0]
        num_images = check_count("num_images", num_images, sizes[0] if sizes else 1)
        check_generator(generator, num_images)
        values = self.prepare_parent_values(parent_values, num_images)
        chain = self.get_chain(num_inference_steps)
        integrator = self.check_integrator(None, chain)
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        noise = randn_tensor((num_images, channels, size, size), generator, self._execution_device, torch.float32)
        latent = None
        if self.semantic_encoder is not None:  # z from its prior, drawn after the noise from the same generator
            latent_shape = (num_images, self.semantic_encoder.config.latent_dim)
            latent = randn_tensor(latent_shape, generator, self._execution_device, torch.float32)
        guidance = Guidance(self.cfg_scales(cfg_scale))
        sample = self._predict(noise, chain, values, guidance, integrator, latent=latent, drawn=True)
        return self.postprocess(sample, output_type)

    def guided_noise(
        self,
        sample: torch.Tensor,
        timestep: int,
        alpha: float,
        values: dict,
        guidance: Guidance,
        latent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps_hat of one prediction step: the noise estimate under the counterfactual parents (with classifier-free
        guidance) and the semantic `latent`, minus sqrt(1 - alpha_bar_t) times each guide's gradient towards them;
        computed differentiably in the sample where a guide needs the noise model's gradient."""
        differentiable = any(getattr(guide, "needs_noise_gradient", False) for guide in guidance.guides)
        with torch.set_grad_enabled(differentiable):
            sample = sample.detach().float().requires_grad_(differentiable)
            eps = self.predict_noise(sample, timestep, values, guidance.cfg_scale, latent)
        steered = eps.detach()
        for guide in guidance.guides:
            steered = steered - math.sqrt(1 - alpha) * guide.gradient(sample, timestep, alpha, values, eps)
        return steered

    def prepare_guidance(
        self, scales: dict, cfg_scale: dict, factual: dict, values: dict, explained, explained_gradient: str, guides
    ) -> Guidance:
        """The guides of one prediction from checked scales: the anti-causal predictor, or the explained classifier
        on the categorical parent, then `guides`. The predictor acts only on samples whose parents change, on all
        their parents, or only on those that change (a conditional mechanism without `hold_unchanged_parents`);
        measured in docs/guidance-of-unchanged-parents.md. A colour map's parents count at their reference values:
        the diffusion never sees them change."""
        factual, values = self.reference_colour_values(factual), self.reference_colour_values(values)
        changed = {name: (values[name] != factual[name]).float() for name in values}
        intervened = torch.stack(list(changed.values())).amax(0)
        if self.mechanism == "classifier-guided" or self.config.hold_unchanged_parents:
            changed = dict.fromkeys(changed, intervened)
        anticausal = {name: scale * changed[name] for name, scale in scales.items() if scale and changed[name].any()}
        steering = []
        if explained is not None:
            parent = self.single_categorical_parent()
            if values[parent].max() >= explained.num_labels:
                raise ValueError(
                    f"`target` {values[parent].max().item()} is not a class of the explained classifier, which has "
                    f"{explained.num_labels} labels."
                )
            scale = anticausal.pop(parent, None)
            if scale is not None:
                steering.append(ExplainedClassifierGuide(explained, parent, scale, explained_gradient))
        if anticausal:
            steering.append(AntiCausalGuide(self.classifier, anticausal))
        return Guidance(cfg_scale, steering + guides, intervened)

    def get_chain(self, num_inference_steps: int | None = None, strength: float = 1.0) -> Chain:
        """The checked DDIM chain that abduction walks up and prediction walks down (default steps: the config's):
        `(t, alpha_bar_t, alpha_bar_next)` for each generation step, t descending, where alpha_bar_next belongs to
        the next listed timestep (or is the scheduler's final alpha-bar). The scheduler gives only its timesteps (any
        `timestep_spacing`) and alphas."""
        train_steps = self.scheduler.config.num_train_timesteps
        num_inference_steps = check_count("num_inference_steps", num_inference_steps, self.config.num_inference_steps)
        if not num_inference_steps <= train_steps:
            raise ValueError(f"`num_inference_steps` must be at most {train_steps}, got {num_inference_steps}.")
        strength = check_strength(strength)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps[-max(1, round(num_inference_steps * strength)) :].tolist()
        alphas = self.scheduler.alphas_cumprod[timesteps].tolist() + [float(self.scheduler.final_alpha_cumprod)]
        return Chain(num_inference_steps, strength, tuple(zip(timesteps, alphas[:-1], alphas[1:], strict=True)))

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: int,
        parents: dict[str, torch.Tensor],
        cfg_scales: dict[str, float],
        latent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps_theta(x_t, t) in float32 whatever the UNet's dtype; for a conditional mechanism eps_theta(x_t, t, pa)
        (or eps_theta(x_t, t, pa, z) with a semantic `latent` z) with per-parent classifier-free guidance, all its
        passes in one batched UNet call. The UNet reads the state in float32 (a float64 one rounded once, the same
        way in abduction and prediction)."""
        sample = sample.float()
        if self.parent_embedding is None:
            return self.as_noise(self.unet(sample.to(self.unet.dtype), timestep).sample.float(), sample, timestep)
        guided = [name for name, scale in cfg_scales.items() if scale != 1]
        dropped = [{}] + [{name: True} for name in guided]
        labels = torch.cat([self.parent_embedding(parents, drop) for drop in dropped])
        labels = labels + self.semantic_embedding(latent, len(guided))
        batch = sample.to(self.unet.dtype).repeat(len(dropped), 1, 1, 1)
        full, *without = self.unet(batch, timestep, class_labels=labels).sample.float().chunk(len(dropped))
        output = full + sum((cfg_scales[n] - 1) * (full - out) for n, out in zip(guided, without, strict=True))
        return self.as_noise(output, sample, timestep)

    def semantic_embedding(self, latent: torch.Tensor | None, dropping_passes: int) -> torch.Tensor | int:
        """z's part of the conditioning of each batched pass: z itself in the pass with every parent, and, as in
        training, z's prior mean in each of the `dropping_passes` that drop a parent; 0 without a semantic latent."""
        if latent is None:
            return 0
        latent = latent.to(self._execution_device)
        return self.semantic_encoder.embed(torch.cat([latent, torch.zeros_like(latent).repeat(dropping_passes, 1)]))

    def as_noise(self, output: torch.Tensor, sample: torch.Tensor, timestep: int) -> torch.Tensor:
        """The UNet's output as eps: itself, or from a velocity v, eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t)
        x_t (linear in the output, so classifier-free guidance may combine either)."""
        if self.scheduler.config.prediction_type == "epsilon":
            return output
        alpha = float(self.scheduler.alphas_cumprod[int(timestep)])
        return math.sqrt(alpha) * output + math.sqrt(1 - alpha) * sample.float()

    def explained_from(self, kwargs: dict, classifier, processor, gradient: str) -> tuple[ExplainedClassifier, str]:
        """The classifier to explain (None: the noise-aware predictor guides), wrapped with its processor, and its
        gradient's kind; the old keywords in `kwargs` still taken, any other unknown keyword refused."""
        classifier, processor, gradient = explained_keywords(kwargs, classifier, processor, gradient)
        if gradient not in ("cheap", "full"):
            raise ValueError(f"`explained_gradient` must be 'cheap' or 'full', got {gradient!r}.")
        if classifier is None or isinstance(classifier, ExplainedClassifier):
            return classifier, gradient
        self.single_categorical_parent()  # explanations name a class of the image's one categorical parent
        if processor is None:
            processor = own_image_processor(classifier)
        return ExplainedClassifier(classifier, processor).to(self._execution_device), gradient


def own_image_processor(classifier):
    """The image processor saved beside a transformers classifier (`preprocessor_config.json` in the folder it was
    loaded from), so that it is fed at the size and normalisation it was trained on; None where there is none."""
    folder = getattr(classifier, "name_or_path", None) or getattr(
        getattr(classifier, "config", None), "_name_or_path", ""
    )
    if not folder or not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def pipeline_causal_graph(config: dict | None, classifier, parent_embedding) -> CausalGraph:
    """The pipeline's graph: as configured, or the single categorical parent of its predictor or embedding."""
    specs = next((c.parents for c in (classifier, parent_embedding) if c is not None), {})
    return folder_causal_graph(config, specs)
