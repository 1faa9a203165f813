"""The MNIST-style protocol (one categorical parent, judged by an independent oracle): counterfactual effectiveness,
realism and minimality at the pipeline's scale, a guidance sweep, reversibility, composition, the abduction's cost
curve, and the mechanism's own generation fidelity."""

import torch

from . import metrics


@torch.no_grad()
def evaluate(
    pipe,
    oracle,
    images: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    options: dict,
    vae=None,
    seed: int = 0,
    sweep_scales=(),
    sweep_samples: int = 100,
    composition_samples: int = 50,
    composition_cycles: int = 10,
    abduction_settings=(),
) -> dict:
    """
    Every MNIST measure of `pipe` on held-out `images` in [0, 1] with true `labels`, the headline at guidance `scale`
    on every image and the costlier ones on the first `sweep_samples` / `composition_samples`.

    Args:
        options: the chain of the abduction and prediction, by the pipeline's names (`num_inference_steps`,
            `abduction_refinement_steps`, `cfg_scale`, `integrator`; None or absent: the pipeline's default).
        sweep_scales: guidance scales of the sweep (none: no sweep); abduction_settings: (steps, K) pairs of the
            abduction curve (none: no curve); composition_cycles: 0 skips composition.
    """
    result, targets, counterfactuals = metrics.evaluate_counterfactuals(
        pipe, oracle, images, labels, [scale], seed=seed, vae=vae, **options
    )
    few, fewest = slice(0, sweep_samples), slice(0, composition_samples)
    if sweep_scales:
        sweep, _, _ = metrics.evaluate_counterfactuals(
            pipe, oracle, images[few], labels[few], sorted(set(sweep_scales) | {scale}), seed=seed, vae=vae, **options
        )
        result["sweep"] = {
            "num_images": sweep["num_images"],
            "scales": sweep["scales"],
            "knee": metrics.knee(sweep["scales"]),
        }
    result["reversibility"] = metrics.reversibility(
        pipe, oracle, images[few], counterfactuals[scale][few], labels[few], targets[few], scale, **options
    )
    factual = {pipe.single_categorical_parent(): labels[fewest]}
    if composition_cycles:
        distance = metrics.oracle_distances(oracle)
        result["composition"] = metrics.composition(
            pipe, images[fewest], factual, composition_cycles, distance, **options
        )
    cfg_scale, settings = options.get("cfg_scale"), list(abduction_settings)
    result["abduction_curve"] = metrics.abduction_curve(pipe, images[fewest], settings, factual, cfg_scale)
    result["generation_fidelity"] = generation_fidelity(pipe, oracle, labels, (1.0, cfg_scale), seed=seed)
    return result


def generation_fidelity(
    pipe, oracle, labels: torch.Tensor, cfg_scales=(1.0, None), num_inference_steps: int = 25, seed: int = 0
) -> dict[str, float]:
    """[`metrics.generation_fidelity`] of one digit per label: the share the oracle reads as the asked class."""
    return metrics.generation_fidelity(
        pipe,
        {pipe.single_categorical_parent(): labels},
        lambda images: (metrics.oracle_predictions(oracle, images) == labels).float().mean().item(),
        cfg_scales,
        num_inference_steps,
        seed,
    )
