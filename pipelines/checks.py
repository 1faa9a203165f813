"""What DiffSCMPipeline checks before any work: settings, scales, targets and components, each refused with a
message that names the argument."""

import math
import numbers

import numpy as np
import torch
from diffusers.utils import deprecate

ScaleInput = float | dict[str, float]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_GUIDANCE_SCALE = 1000.0  # far past any measured useful scale (at most 40); beyond it a sample is only noise


def is_real(value) -> bool:
    """A real number (Python, numpy or a 0-d tensor), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_count(name: str, value, default, minimum: int = 1) -> int:
    """An integer setting (Python, numpy or 0-d tensor) >= `minimum`; `default` when None."""
    value = default if value is None else value
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_eta(eta) -> float:
    if not is_real(eta) or not 0 <= float(eta) <= 1:
        raise ValueError(f"`eta` must be a number in [0, 1], got {eta!r}.")
    return float(eta)


def check_strength(strength) -> float:
    if not is_real(strength) or not 0 < strength <= 1:
        raise ValueError(f"`strength` must be a number in (0, 1], got {strength!r}.")
    return float(strength)


def check_output_type(output_type: str):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}.")


def check_scale(name: str, value) -> float:
    """A guidance scale: a finite number in [0, `MAX_GUIDANCE_SCALE`]."""
    if not is_real(value) or not math.isfinite(float(value)) or not 0 <= float(value) <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"`{name}` must be a number in [0, {MAX_GUIDANCE_SCALE:g}] (or one per parent): {value!r}.")
    return float(value)


def check_finite(sample: torch.Tensor, what: str, scales: dict, after_callback: bool = False):
    if not torch.isfinite(sample).all():
        cause = " (after your callback)" if after_callback else ""
        blamed = "the callback returned them, or " if after_callback else ""
        raise ValueError(
            f"{what}{cause} became NaN or infinite: {blamed}the guidance is too strong ({scales}); lower it."
        )


def check_noise(noise, channels: int, size: int):
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape[1:]) != (channels, size, size):
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"`noise` must be a tensor (B, {channels}, {size}, {size}) from `abduct`; got {shape}.")
    if not torch.isfinite(noise).all():
        raise ValueError("`noise` contains NaN or infinite values.")


def check_residuals(residuals, integrator: str, batch_size: int, steps: int, channels: int, size: int):
    """The residual integrator's abduction carries one residual per sample and step of its chain; others carry none."""
    if integrator != "residual":
        if residuals is not None:
            raise ValueError(f"The abduction carries residuals, but its integrator is {integrator!r}, not 'residual'.")
        return
    expected = (batch_size, steps, channels, size, size)
    if not isinstance(residuals, torch.Tensor) or tuple(residuals.shape) != expected:
        shape = tuple(residuals.shape) if isinstance(residuals, torch.Tensor) else type(residuals).__name__
        raise ValueError(f"`residuals` must be a tensor {expected} from the residual integrator; got {shape}.")
    if not torch.isfinite(residuals).all():
        raise ValueError("`residuals` contains NaN or infinite values.")


def check_semantic_latent(latent, encoder, batch_size: int):
    """An abduction's semantic latent fits the pipeline: one z per sample with an encoder, none without."""
    if encoder is None:
        if latent is not None:
            raise ValueError("The abduction carries a semantic latent, but this pipeline has no `semantic_encoder`.")
        return
    expected = (batch_size, encoder.config.latent_dim)
    if not isinstance(latent, torch.Tensor) or tuple(latent.shape) != expected:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"`semantic_latent` must be a tensor {expected} from this pipeline's `abduct`; got {shape}.")
    if not torch.isfinite(latent).all():
        raise ValueError("`semantic_latent` contains NaN or infinite values.")


def check_callback(tensor_inputs, allowed: list[str]):
    if not set(tensor_inputs) <= set(allowed):
        raise ValueError(f"`callback_on_step_end_tensor_inputs` must be within {allowed}.")


def check_generator(generator, size: int):
    """None, a `torch.Generator`, or a list of one per sample (`torch.Generator().manual_seed(0)`, not a seed)."""
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(
            f"`generator` takes a torch.Generator or a list of them, got {generator!r}; for a seed use "
            "torch.Generator().manual_seed(seed)."
        )
    if isinstance(generator, list) and len(generator) != size:
        raise ValueError(f"Got {len(generator)} generators for {size} samples; pass one per sample.")


def class_targets(target, batch_size: int, num_classes: int) -> torch.Tensor:
    """`target=` (an int, one per image, a `(B, K)` array or "all") as a `(batch_size, K)` long tensor."""
    if isinstance(target, str) and target == "all":
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


def check_semantic_encoder(encoder, unet, parent_embedding):
    """A semantic encoder conditions a conditional UNet beside its parents, on the UNet's images."""
    if parent_embedding is None:
        raise ValueError("A `semantic_encoder` conditions the UNet beside the parents: it needs a `parent_embedding`.")
    width = parent_embedding.config.embedding_dim
    if (encoder.config.in_channels, encoder.config.embedding_dim) != (unet.config.in_channels, width):
        raise ValueError(
            f"The semantic encoder reads {encoder.config.in_channels}-channel images into a "
            f"{encoder.config.embedding_dim}-wide embedding; the UNet takes {unet.config.in_channels} channels and a "
            f"{width}-wide one."
        )


MAX_SAMPLE_SIZE = 4096  # larger: an input resized to it would take gigabytes before the first UNet pass


def check_colour_map(colour_map, unet, parent_embedding, graph):
    """A colour map sets some parents of a conditional UNet's image, on the UNet's images."""
    if parent_embedding is None:
        raise ValueError(
            "A `colour_map` holds its parents at reference values for a conditional UNet: it needs a "
            "`parent_embedding`."
        )
    if colour_map.config.num_channels != unet.config.in_channels:
        raise ValueError(
            f"The colour map maps {colour_map.config.num_channels} channels; the UNet takes {unet.config.in_channels}."
        )
    specs = graph.parent_specs()
    for name, spec in colour_map.parents.items():
        if specs.get(name) != spec:
            raise ValueError(
                f"The colour map's parent {name!r} ({spec}) is not the causal graph's parent of the image "
                f"({specs.get(name)})."
            )


def check_components(unet, scheduler, classifier, parent_embedding, graph, semantic_encoder=None, colour_map=None):
    """The components fit each other and the causal graph."""
    size = unet.config.sample_size
    if not isinstance(size, int) or not 1 <= size <= MAX_SAMPLE_SIZE:
        raise ValueError(
            f"The UNet's sample_size is {size!r}: a square image side of 1 to {MAX_SAMPLE_SIZE} pixels is expected "
            "(every input would be resized to it); check unet/config.json."
        )
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"Only epsilon- and v-prediction UNets are supported, got {scheduler.config.prediction_type!r}."
        )
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
    if semantic_encoder is not None:
        check_semantic_encoder(semantic_encoder, unet, parent_embedding)
    if colour_map is not None:
        check_colour_map(colour_map, unet, parent_embedding, graph)
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


def renamed_keyword(kwargs: dict, old: str, new: str, value):
    """A keyword's new name, the old one still taken (with diffusers' deprecation warning)."""
    if old in kwargs:
        if value is not None:
            raise TypeError(f"Give `{new}` only (`{old}` is its old name).")
        value = kwargs.pop(old)
        deprecate(old, "1.0.0", f"`{old}` is now `{new}`.")
    return value


def explained_keywords(kwargs: dict, classifier, processor, gradient) -> tuple:
    """`explained_classifier`, `explained_processor` and `explained_gradient`, the old `classifier`,
    `classifier_processor` and `classifier_gradient` still taken; any other unknown keyword refused."""
    classifier = renamed_keyword(kwargs, "classifier", "explained_classifier", classifier)
    processor = renamed_keyword(kwargs, "classifier_processor", "explained_processor", processor)
    if "classifier_gradient" in kwargs:
        gradient = kwargs.pop("classifier_gradient")
        deprecate("classifier_gradient", "1.0.0", "`classifier_gradient` is now `explained_gradient`.")
    if kwargs:
        raise TypeError(f"Unexpected keyword argument(s): {sorted(kwargs)}.")
    return classifier, processor, gradient
