"""Counterfactual metrics judged by the independent oracle: effectiveness, null-intervention composition, cost."""

import time
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def count_calls(module: torch.nn.Module):
    """Count the samples passed through `module.forward` (one UNet evaluation per sample and call)."""
    counter = {"samples": 0}

    def hook(_module, inputs, _output):
        counter["samples"] += inputs[0].shape[0]

    handle = module.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


@torch.no_grad()
def oracle_predictions(oracle, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Oracle class of images in [0, 1]."""
    return torch.cat([oracle(chunk * 2 - 1).argmax(-1) for chunk in images.split(batch_size)])


def random_other_targets(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random class different from each label (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def grey_level_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference on the 0-255 scale of images in [0, 1]."""
    return (a - b).abs().mean().item() * 255


def evaluate_counterfactuals(pipe, oracle, images, labels, scales, steps=None, refinement=None, seed=0) -> dict:
    """
    Effectiveness (oracle flip rate to a random other target) per guidance scale, and composition of the null
    intervention (oracle keeps the label; L1 in grey levels), all from one abduction per image; plus the UNet and
    classifier-gradient evaluations and seconds per counterfactual.
    """
    num_classes = pipe.classifier.config.num_classes
    targets = random_other_targets(labels, num_classes, seed)
    steps = steps or pipe.config.num_inference_steps
    count = len(images)

    with count_calls(pipe.unet) as unet_calls:
        started = time.perf_counter()
        noise = pipe.abduct(images, num_inference_steps=steps, abduction_refinement_steps=refinement)
        abduction_seconds = time.perf_counter() - started
    abduction_nfe = unet_calls["samples"] / count

    null = pipe.intervene(noise, labels, guidance_scale=0.0, num_inference_steps=steps)
    null_predictions = oracle_predictions(oracle, null)
    result = {
        "num_images": count,
        "num_inference_steps": steps,
        "abduction_refinement_steps": pipe.config.abduction_refinement_steps if refinement is None else refinement,
        "abduction_nfe": abduction_nfe,
        "null_intervention": {
            "oracle_keeps_label": (null_predictions == labels).float().mean().item(),
            "l1_grey_levels": grey_level_l1(null, images),
        },
        "oracle_accuracy_on_factuals": (oracle_predictions(oracle, images) == labels).float().mean().item(),
        "scales": {},
    }
    for scale in scales:
        with count_calls(pipe.unet) as unet_calls, count_calls(pipe.classifier) as classifier_calls:
            started = time.perf_counter()
            counterfactuals = pipe.intervene(noise, targets, guidance_scale=scale, num_inference_steps=steps)
            seconds = time.perf_counter() - started
        predictions = oracle_predictions(oracle, counterfactuals)
        result["scales"][str(scale)] = {
            "guidance_scale": scale,
            "flip_rate": (predictions == targets).float().mean().item(),
            "l1_grey_levels_to_factual": grey_level_l1(counterfactuals, images),
            "nfe_per_counterfactual": abduction_nfe + unet_calls["samples"] / count,
            "classifier_gradients_per_counterfactual": classifier_calls["samples"] / count,
            "seconds_per_counterfactual": (abduction_seconds + seconds) / count,
        }
    return result


def knee(scales: dict, tolerance: float = 0.01) -> float:
    """The smallest guidance scale whose flip rate is within `tolerance` of the best one."""
    best = max(entry["flip_rate"] for entry in scales.values())
    return min(entry["guidance_scale"] for entry in scales.values() if entry["flip_rate"] >= best - tolerance)


def summary_table(result: dict) -> str:
    lines = [
        "| guidance scale | oracle flip rate | L1 to factual (grey levels) | UNet NFE / cf | classifier grads / cf "
        "| s / cf |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["scales"].values():
        lines.append(
            f"| {entry['guidance_scale']:g} | {entry['flip_rate']:.3f} | {entry['l1_grey_levels_to_factual']:.1f} | "
            f"{entry['nfe_per_counterfactual']:.0f} | {entry['classifier_gradients_per_counterfactual']:.0f} | "
            f"{entry['seconds_per_counterfactual']:.3f} |"
        )
    null = result["null_intervention"]
    lines.append("")
    lines.append(
        f"Null intervention (guidance 0): oracle keeps the label on {null['oracle_keeps_label']:.3f} of "
        f"{result['num_images']} held-out digits; reconstruction L1 {null['l1_grey_levels']:.2f} grey levels (0-255)."
    )
    return "\n".join(lines) + "\n"


def to_unit_tensor(images) -> torch.Tensor:
    """PIL digits -> float `(N, 1, H, W)` in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(img, dtype=np.float32) / 255 for img in images]))[:, None]
