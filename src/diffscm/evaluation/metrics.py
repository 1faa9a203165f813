"""Counterfactual metrics judged by the independent oracle: effectiveness, null-intervention composition, cost."""

import time
from contextlib import contextmanager

import torch

from ..tables import markdown_table


@contextmanager
def count_calls(module: torch.nn.Module | None):
    """Count the samples passed through `module.forward` (one UNet evaluation per sample and call); none without."""
    counter = {"samples": 0}
    if module is None:
        yield counter
        return

    def hook(_module, args, kwargs, _output):
        counter["samples"] += next(iter([*args, *kwargs.values()])).shape[0]  # positional or `pixel_values=`

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@torch.no_grad()
def oracle_predictions(oracle, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Oracle class of images in [0, 1], on the CPU (the oracle may be on any device)."""
    device = _device(oracle)
    return torch.cat([oracle(chunk.to(device) * 2 - 1).argmax(-1).cpu() for chunk in images.split(batch_size)])


def _device(module) -> torch.device:
    """Where a judge's weights are (the CPU for one without parameters)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def random_other_targets(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random class different from each label (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


@torch.no_grad()
def explanation_metrics(
    pipe,
    oracle,
    images,
    labels,
    explained,
    scale: float,
    noise_aware_scale: float,
    seed=0,
    **options,
) -> dict:
    """
    Counterfactual explanations of a clean classifier `explained` (an `ExplainedClassifier`) to a random other digit,
    with its cheap and its full gradient, beside the pipeline's own noise-aware guidance from the same abduction:
    the flip rate by the explained classifier and by the independent oracle (a change the oracle does not see is
    adversarial), L1 and oracle-feature distance to the factual, FD, and the UNet evaluations and classifier
    gradients per counterfactual. `options`: the abduction's (`num_inference_steps`, `abduction_refinement_steps`,
    `integrator`, ...).
    """
    parent = pipe.single_categorical_parent()
    targets = random_other_targets(labels, pipe.causal_graph.nodes[parent].num_classes, seed)
    count = len(images)
    with count_calls(pipe.unet) as abduction_calls:
        abduction = pipe.abduct(images, {parent: labels}, **options)
    result = {
        "num_images": count,
        "explained_accuracy_on_factuals": _accuracy(explained.predict(images * 2 - 1), labels),
    }
    variants = {"noise-aware predictor": ({"guidance_scale": noise_aware_scale}, pipe.classifier)}
    for gradient in ("cheap", "full"):
        guidance = {"guidance_scale": scale, "explained_classifier": explained, "explained_gradient": gradient}
        variants[f"explained, {gradient} gradient"] = (guidance, explained.model)
    for name, (guidance, guide) in variants.items():
        with count_calls(pipe.unet) as unet_calls, count_calls(guide) as guide_calls:
            started = time.perf_counter()
            counterfactuals = pipe.intervene(abduction, targets, **guidance)
            seconds = time.perf_counter() - started
        result[name] = {
            "guidance_scale": guidance["guidance_scale"],
            "explained_flip_rate": _accuracy(explained.predict(counterfactuals * 2 - 1), targets),
            "oracle_flip_rate": _accuracy(oracle_predictions(oracle, counterfactuals), targets),
            "l1_grey_levels_to_factual": grey_level_l1(counterfactuals, images),
            "perceptual_distance": perceptual_distance(oracle, counterfactuals, images),
            "frechet_distance": realism(oracle, counterfactuals, images)["frechet_distance"],
            "nfe_per_counterfactual": (abduction_calls["samples"] + unet_calls["samples"]) / count,
            "classifier_passes_per_counterfactual": guide_calls["samples"] / count,
            "seconds_per_counterfactual": seconds / count,
        }
    return result


def explanation_table(result: dict) -> str:
    header = [
        "guidance",
        "scale",
        "flip rate, explained classifier",
        "flip rate, independent oracle",
        "L1 to factual",
        "oracle-feature distance",
        "FD",
        "UNet NFE / cf",
        "classifier passes / cf",
        "s / cf",
    ]
    rows = [
        [
            name,
            f"{row['guidance_scale']:g}",
            f"{row['explained_flip_rate']:.3f}",
            f"{row['oracle_flip_rate']:.3f}",
            f"{row['l1_grey_levels_to_factual']:.1f}",
            f"{row['perceptual_distance']:.4f}",
            f"{row['frechet_distance']:.2f}",
            f"{row['nfe_per_counterfactual']:.0f}",
            f"{row['classifier_passes_per_counterfactual']:.0f}",
            f"{row['seconds_per_counterfactual']:.3f}",
        ]
        for name, row in result.items()
        if isinstance(row, dict)
    ]
    intro = (
        f"Explanations of {result['num_images']} held-out digits to a random other digit (the explained classifier "
        f"reads {result['explained_accuracy_on_factuals']:.3f} of the factuals right)."
    )
    return f"{intro}\n\n{markdown_table(header, rows)}\n"


def _accuracy(predicted: torch.Tensor, expected: torch.Tensor) -> float:
    return (predicted.cpu() == expected.cpu()).float().mean().item()


def ink_ratios(counterfactuals: torch.Tensor, targets: torch.Tensor, real: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per target class: the median ink (sum of grey levels) of its counterfactuals over the median ink of the real
    digits of that class (1 = as much ink as real digits; specks are far below, blots far above)."""
    ink, real_ink = counterfactuals.flatten(1).sum(1), real.flatten(1).sum(1)
    return {
        int(k): (ink[targets == k].median() / real_ink[labels == k].median()).item()
        for k in targets.unique().tolist()
        if (labels == k).any()
    }


def grey_level_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference on the 0-255 scale of images in [0, 1] (on any devices)."""
    return (a.detach().cpu().float() - b.detach().cpu().float()).abs().mean().item() * 255


def evaluate_counterfactuals(pipe, oracle, images, labels, scales, seed=0, vae=None, **options):
    """
    Effectiveness (oracle flip rate to a random other target) and realism per guidance scale, and the null
    intervention (oracle keeps the label; L1 in grey levels), all from one abduction per image; plus the UNet and
    classifier-gradient evaluations and seconds per counterfactual. `options`: the abduction's and prediction's
    chain (`num_inference_steps`, `strength`, `abduction_refinement_steps`, `cfg_scale`, `integrator`). Returns the
    metrics, the targets and the counterfactuals of each scale.
    """
    parent = pipe.single_categorical_parent()
    targets = random_other_targets(labels, pipe.causal_graph.nodes[parent].num_classes, seed)
    count = len(images)

    with count_calls(pipe.unet) as unet_calls:
        started = time.perf_counter()
        abduction = pipe.abduct(images, {parent: labels}, **options)
        abduction_seconds = time.perf_counter() - started
    abduction_nfe = unet_calls["samples"] / count

    null = pipe.intervene(abduction)
    null_predictions, factual_predictions = oracle_predictions(oracle, null), oracle_predictions(oracle, images)
    result = {
        "num_images": count,
        "num_inference_steps": abduction.num_inference_steps,
        "strength": abduction.strength,
        "abduction_refinement_steps": abduction.abduction_refinement_steps,
        "integrator": abduction.integrator,
        "cfg_scale": abduction.cfg_scale,
        "abduction_nfe": abduction_nfe,
        "null_intervention": {
            "oracle_keeps_label": (null_predictions == labels).float().mean().item(),
            "oracle_keeps_its_factual_prediction": (null_predictions == factual_predictions).float().mean().item(),
            "l1_grey_levels": grey_level_l1(null, images),
        },
        "oracle_accuracy_on_factuals": (factual_predictions == labels).float().mean().item(),
        "scales": {},
    }
    outputs = {}
    for scale in scales:
        with count_calls(pipe.unet) as unet_calls, count_calls(pipe.classifier) as classifier_calls:
            started = time.perf_counter()
            counterfactuals = pipe.intervene(abduction, targets, guidance_scale=scale)
            seconds = time.perf_counter() - started
        predictions = oracle_predictions(oracle, counterfactuals)
        result["scales"][str(scale)] = {
            "guidance_scale": scale,
            "flip_rate": (predictions == targets).float().mean().item(),
            "l1_grey_levels_to_factual": grey_level_l1(counterfactuals, images),
            "nfe_per_counterfactual": abduction_nfe + unet_calls["samples"] / count,
            "classifier_gradients_per_counterfactual": classifier_calls["samples"] / count,
            "seconds_per_counterfactual": (abduction_seconds + seconds) / count,
            "realism": realism(oracle, counterfactuals, images),
            "ink_ratio_by_class": ink_ratios(counterfactuals, targets, images, labels),
        }
        if vae is not None:
            result["scales"][str(scale)]["cld"] = minimality(vae, images, counterfactuals, labels, targets)
        outputs[scale] = counterfactuals
    return result, targets, outputs


@torch.no_grad()
def abduction_curve(
    pipe, images: torch.Tensor, settings: list[tuple[int, int]], factual: dict, cfg_scale=None
) -> list[dict]:
    """Null-intervention L1 (grey levels) against UNet evaluations per round trip, for (steps, refinement) pairs;
    `factual` holds the factual values of the image's parents."""
    curve = []
    for steps, refinement in settings:
        with count_calls(pipe.unet) as calls:
            abduction = pipe.abduct(
                images, factual, num_inference_steps=steps, abduction_refinement_steps=refinement, cfg_scale=cfg_scale
            )
            null = pipe.intervene(abduction)
        curve.append(
            {
                "num_inference_steps": steps,
                "abduction_refinement_steps": refinement,
                "nfe_round_trip": calls["samples"] / len(images),
                "l1_grey_levels": grey_level_l1(null, images),
            }
        )
    return curve


@torch.no_grad()
def composition(pipe, images: torch.Tensor, parents: dict, cycles: int = 10, distance=None, **options) -> dict:
    """
    The null intervention do(every parent of the image = its factual value), through the public call, applied again
    and again: how far does the image drift from the factual `images` in [0, 1] after 1 and after `cycles` cycles?

    Args:
        parents: the factual value of every parent of the image, one per image.
        distance: `f(current, images)`, a number or a dict of them (default: the grey-level L1).
        options: the call's settings (`num_inference_steps`, `cfg_scale`, ...).
    """
    distance = distance or grey_level_l1
    result, current = {}, images
    for cycle in range(1, cycles + 1):
        current = pipe(current, intervention=parents, factual_values=parents, output_type="pt", **options).images
        if cycle in (1, cycles):
            result[f"cycles_{cycle}"] = distance(current, images)
    return result


@torch.no_grad()
def generation_fidelity(pipe, parents: dict, score, cfg_scales=(1.0, None), num_inference_steps=25, seed=0) -> dict:
    """
    The image mechanism alone: one image per sample of `parents` drawn from fresh noise (no abduction, no anti-causal
    guidance), `score(images)` at each classifier-free scale of `cfg_scales` (None: the pipeline's default), keyed
    `cfg 1` or by the scales used; {} for a classifier-guided pipeline, whose mechanism ignores its parents.
    """
    if pipe.mechanism != "conditional":
        return {}
    result = {}
    for cfg_scale in cfg_scales:
        scales = pipe.cfg_scales(cfg_scale)
        shown = f"{next(iter(scales.values())):g}" if len(set(scales.values())) == 1 else str(scales)
        if f"cfg {shown}" in result:  # the pipeline's default is a scale already measured
            continue
        generator = torch.Generator(pipe.device).manual_seed(seed)
        images = pipe.generate(
            parents,
            num_inference_steps=num_inference_steps,
            cfg_scale=cfg_scale,
            generator=generator,
            output_type="pt",
        )
        result[f"cfg {shown}"] = score(images)
    return result


def oracle_distances(oracle):
    """The composition distances of the MNIST protocol: grey-level L1 and the oracle-feature perceptual distance."""
    return lambda current, images: {
        "l1_grey_levels": grey_level_l1(current, images),
        "perceptual_distance": perceptual_distance(oracle, current, images),
    }


@torch.no_grad()
def counterfactuals_by_request(pipe, images: torch.Tensor, parents: dict, requests: dict[str, dict], **options):
    """
    The skeleton of every protocol with a causal graph: one abduction of the factual `images` under their `parents`,
    then for each request `{variable: the expected values of every variable under do(variable)}`, yields
    `(variable, expected, counterfactuals, undone)`: the counterfactuals, and do() undone from their own abduction
    (reversibility). Each protocol scores them with its own judges.

    Args:
        options: `guidance_scale` (the prediction's) and the chain (`num_inference_steps`, `cfg_scale`, ...).
    """
    guidance = options.pop("guidance_scale", None)
    abduction = pipe.abduct(images, parents, **options)
    for variable, expected in requests.items():
        values = {name: expected[name] for name in pipe.causal_graph.image_parents}
        counterfactuals = pipe.intervene(abduction, values, guidance_scale=guidance)
        yield variable, expected, counterfactuals, undone(pipe, counterfactuals, values, parents, guidance, **options)


@torch.no_grad()
def undone(pipe, counterfactuals: torch.Tensor, values: dict, factual: dict, guidance_scale=None, **options):
    """do(v*) undone: the counterfactuals abducted under their own `values`, then predicted under the `factual`
    parents, with the chain `options` (reversibility, in every protocol)."""
    abduction = pipe.abduct(counterfactuals, values, **options)
    return pipe.intervene(abduction, factual, guidance_scale=guidance_scale)


@torch.no_grad()
def reversibility(pipe, oracle, images, counterfactuals, labels, targets, scale, **options) -> dict:
    """x -> do(target) -> do(original label): L1 to x and the oracle's accuracy on the original label."""
    parent = pipe.single_categorical_parent()
    reversed_images = undone(pipe, counterfactuals, {parent: targets}, {parent: labels}, scale, **options)
    return {
        "guidance_scale": scale,
        "l1_grey_levels": grey_level_l1(reversed_images, images),
        "oracle_accuracy_on_original_label": (oracle_predictions(oracle, reversed_images) == labels)
        .float()
        .mean()
        .item(),
    }


def minimality(vae, factuals, counterfactuals, labels, targets) -> dict:
    """Mean CLD with the paper's weights (1, 1) and the benchmark's (0.8, 0.2); the factuals are the reference set."""
    from .vae import counterfactual_latent_divergence

    device = _device(vae)
    factuals, counterfactuals, labels, targets = (x.to(device) for x in (factuals, counterfactuals, labels, targets))
    return {
        name: counterfactual_latent_divergence(
            vae, factuals, counterfactuals, labels, targets, factuals, labels, weights
        )
        .mean()
        .item()
        for name, weights in (("paper", (1.0, 1.0)), ("benchmark", (0.8, 0.2)))
    }


@torch.no_grad()
def perceptual_distance(oracle, a: torch.Tensor, b: torch.Tensor) -> float:
    """LPIPS-style distance in the oracle's feature space (channel-normalised maps, uniform stage weights)."""
    device = _device(oracle)
    a, b, total = a.to(device), b.to(device), torch.zeros(len(a), device=device)
    for map_a, map_b in zip(oracle.stage_features(a * 2 - 1), oracle.stage_features(b * 2 - 1), strict=True):
        map_a = map_a / (map_a.norm(dim=1, keepdim=True) + 1e-10)
        map_b = map_b / (map_b.norm(dim=1, keepdim=True) + 1e-10)
        total += (map_a - map_b).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total.mean().item()


class OracleFeatures(torch.nn.Module):
    """The oracle's embedding as a torchmetrics feature extractor: images in [0, 1] in, `(N, num_features)` out."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle
        size = oracle.config.sample_size
        probe = torch.zeros(1, oracle.config.in_channels, size, size, device=_device(oracle))
        self.num_features = oracle.embed(probe).shape[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.oracle.embed(images.to(_device(self.oracle)) * 2 - 1).cpu()


@torch.no_grad()
def realism(oracle, generated: torch.Tensor, real: torch.Tensor, kid_subset: int = 100) -> dict:
    """Frechet distance and KID (torchmetrics) between generated and real images in the oracle's embedding space."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features = OracleFeatures(oracle)
    size = min(kid_subset, len(generated), len(real))
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    kid = KernelInceptionDistance(feature=features, subsets=10, subset_size=size, normalize=True)
    for metric in (fid, kid):
        metric.update(real.cpu(), real=True)
        metric.update(generated.cpu(), real=False)
    return {"frechet_distance": fid.compute().item(), "kid": kid.compute()[0].item()}


def knee(scales: dict, tolerance: float = 0.01) -> float:
    """The smallest guidance scale whose flip rate is within `tolerance` of the best one."""
    best = max(entry["flip_rate"] for entry in scales.values())
    return min(entry["guidance_scale"] for entry in scales.values() if entry["flip_rate"] >= best - tolerance)


def summary_table(result: dict) -> str:
    """The Markdown report of `diffscm evaluate`."""
    lines = [
        f"Data: {result.get('data', 'held-out digits')}; DDIM steps each way: {result['num_inference_steps']}; "
        f"abduction refinement passes per step: {result['abduction_refinement_steps']}; integrator: "
        f"{result.get('integrator', 'ddim')}.",
        "",
        *_scale_table(result["scales"], result["num_images"]),
    ]
    if "sweep" in result:
        lines += ["", f"Guidance-scale sweep (knee: s = {result['sweep']['knee']:g}):", ""]
        lines += _scale_table(result["sweep"]["scales"], result["sweep"]["num_images"])
    for entry in result["scales"].values():
        ratios = entry["ink_ratio_by_class"]
        if not ratios:  # no real digit of any target class among the evaluated ones
            continue
        shown = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(ratios.items(), key=lambda item: int(item[0])))
        low, high = min(ratios.values()), max(ratios.values())
        lines += [
            "",
            f"- Median ink of the counterfactuals over that of real digits, by target class (scale "
            f"{entry['guidance_scale']:g}): {shown} (range {low:.2f}-{high:.2f}).",
        ]
    null = result["null_intervention"]
    lines += [
        "",
        f"- Null intervention (guidance 0) on {result['num_images']} images: reconstruction L1 "
        f"{null['l1_grey_levels']:.2f} grey levels (0-255); the oracle predicts the true label on "
        f"{null['oracle_keeps_label']:.3f} of them (on {result['oracle_accuracy_on_factuals']:.3f} of the factuals) "
        f"and its own prediction for the factual on {null['oracle_keeps_its_factual_prediction']:.3f}.",
    ]
    for name, entry in result.get("composition", {}).items():
        lines.append(
            f"- Composition after {name.split('_')[1]} null-intervention cycle(s): L1 {entry['l1_grey_levels']:.2f} "
            f"grey levels, oracle-feature perceptual distance {entry['perceptual_distance']:.4f}."
        )
    if "reversibility" in result:
        rev = result["reversibility"]
        lines.append(
            f"- Reversibility at scale {rev['guidance_scale']:g} (x -> do(target) -> do(label)): L1 "
            f"{rev['l1_grey_levels']:.2f} grey levels; the oracle finds the original label on "
            f"{rev['oracle_accuracy_on_original_label']:.3f}."
        )
    lines.append("- Realism is measured in the oracle's feature space (Inception weights cannot be downloaded here).")
    fidelity = result.get("generation_fidelity", {})
    if fidelity:
        shown = ", ".join(f"{scale}: {accuracy:.3f}" for scale, accuracy in fidelity.items())
        lines.append(
            f"- The mechanism alone (fresh noise, no abduction, no anti-causal guidance, the labels of the same "
            f"{result['num_images']} digits): the oracle reads the asked digit on {shown}."
        )
    if result.get("abduction_curve"):
        header = ["DDIM steps", "refinement passes K", "UNet NFE per round trip", "null-intervention L1"]
        rows = [
            [
                p["num_inference_steps"],
                p["abduction_refinement_steps"],
                f"{p['nfe_round_trip']:.0f}",
                f"{p['l1_grey_levels']:.2f}",
            ]
            for p in result["abduction_curve"]
        ]
        lines += ["", markdown_table(header, rows, [True] * 4)]
    return "\n".join(lines) + "\n"


def _scale_table(scales: dict, num_images: int) -> list[str]:
    header = [
        "guidance scale",
        f"oracle flip rate ({num_images} images)",
        "L1 to factual",
        "CLD (paper / benchmark)",
        "FD (oracle)",
        "KID (oracle)",
        "UNet NFE / cf",
        "classifier grads / cf",
        "s / cf",
    ]
    rows = [
        [
            f"{e['guidance_scale']:g}",
            f"{e['flip_rate']:.3f}",
            f"{e['l1_grey_levels_to_factual']:.1f}",
            _cld(e),
            f"{e['realism']['frechet_distance']:.2f}",
            f"{e['realism']['kid']:.4f}",
            f"{e['nfe_per_counterfactual']:.0f}",
            f"{e['classifier_gradients_per_counterfactual']:.0f}",
            f"{e['seconds_per_counterfactual']:.3f}",
        ]
        for e in scales.values()
    ]
    return markdown_table(header, rows, [True] * len(header)).split("\n")


def _cld(entry: dict) -> str:
    return f"{entry['cld']['paper']:.3f} / {entry['cld']['benchmark']:.3f}" if "cld" in entry else "-"
