"""The Morpho-MNIST counterfactual benchmark's protocol (Melistas et al. 2024), judged twice.

One do() per variable with the benchmark's own intervention values (`benchmark_intervention_values`: another bin of
the data's values, or another digit); descendants follow the causal graph's mechanisms (do(thickness) also sets
intensity). Every counterfactual is scored against the counterfactual values of all the image's parents, so that the
intervened variable gives effectiveness and the others give the side effects (how far a variable that should not move
did). Two families of judges, never the anti-causal predictors that guided (their reading is reported beside):

- `benchmark`: the benchmark's own predictors (thickness given the counterfactual intensity, intensity, digit), in
  eval mode; `benchmark (batch statistics)`: the same weights as the benchmark's evaluation script ran them, BatchNorm
  on each batch's statistics (its script never calls `.eval()`), in batches of 256;
- `morphometrics`: thickness and intensity measured by Morpho-MNIST's morphometrics, the digit by an independent
  oracle classifier.
"""

import numpy as np
import torch

from .. import morphometrics
from ..tables import markdown_table
from .benchmark_judges import benchmark_intervention_values, composition_l1
from .metrics import composition as metrics_composition
from .metrics import counterfactuals_by_request, grey_level_l1, minimality, oracle_predictions, realism
from .metrics import generation_fidelity as generation_fidelity_of

PARENTS = ("thickness", "intensity", "digit")
GROUND_TRUTH = ("thickness", "intensity")  # the do()s whose true counterfactual the data's own process redraws
GROUND_TRUTH_READING = "ground-truth counterfactual"
BENCHMARK_BATCH = 256  # the HVAE's evaluation batch in the benchmark (VAE and GAN: 128)


def intervention_requests(graph, factual: dict, pool: dict, seed: int = 0) -> dict[str, dict]:
    """{variable: the counterfactual values of every variable under the benchmark's do(variable)}, one per image;
    `pool` holds the data set's values of the continuous variables, from which the benchmark draws."""
    return {
        variable: graph.counterfactual(
            factual,
            {variable: benchmark_intervention_values(variable, factual[variable], pool.get(variable), seed + offset)},
        )
        for offset, variable in enumerate(PARENTS)
    }


@torch.no_grad()
def judge(images: torch.Tensor, expected: dict, oracle, judges=None, pipe=None) -> dict[str, dict]:
    """
    Each family's reading of images `(B, 1, 28, 28)` in [0, 1], scored against the `expected` parents: per family,
    `thickness_mae` (px), `intensity_mae` (grey levels) and `digit_accuracy`. The benchmark's thickness judge is
    conditioned on the expected intensity, as the benchmark scores it.
    """
    readings = {"morphometrics": morphometrics.measure(images) | {"digit": oracle_predictions(oracle, images).numpy()}}
    if judges is not None:
        readings["benchmark"] = judges.predict(images, expected["intensity"])
        readings["benchmark (batch statistics)"] = judges.predict(
            images, expected["intensity"], batch_size=BENCHMARK_BATCH, batch_statistics=True
        )
    if pipe is not None and pipe.classifier is not None:
        readings["predictor (guide, not a judge)"] = pipe.read_parents(images * 2 - 1)
    return {family: score(reading, expected) for family, reading in readings.items()}


def score(reading: dict, expected: dict) -> dict:
    return {
        "thickness_mae": float(np.abs(reading["thickness"] - expected["thickness"]).mean()),
        "intensity_mae": float(np.abs(reading["intensity"] - expected["intensity"]).mean()),
        "digit_accuracy": float((reading["digit"] == expected["digit"]).mean()),
    }


def ground_truth_counterfactuals(images: torch.Tensor, thickness: np.ndarray, intensity: np.ndarray) -> torch.Tensor:
    """Each factual digit re-drawn at `thickness` and scaled to `intensity` by the data's own process, in [0, 1]."""
    grey = morphometrics.as_grey_levels(images)
    drawn = [morphometrics.redraw(image, t, i) for image, t, i in zip(grey, thickness, intensity, strict=True)]
    return torch.from_numpy(np.stack(drawn) / 255).float()[:, None]


@torch.no_grad()
def evaluate_interventions(
    pipe, oracle, images: torch.Tensor, factual: dict, pool: dict, judges=None, seed: int = 0, vae=None, **options
) -> dict:
    """
    The protocol for every parent of the image from one abduction per image: effectiveness and side effects by every
    family of judges, realism, reversibility (do(v*) then do(v = factual) from the counterfactual's own abduction),
    CLD of do(digit) with `vae`, and for do(thickness) and do(intensity) the distance to the ground-truth
    counterfactual and every judge's reading of it (what a perfect counterfactual scores: each judge's floor).

    Args:
        images: factual images `(B, 1, 28, 28)` in [0, 1]; factual: their true `thickness`, `intensity`, `digit`.
        pool: the data set's `thickness` and `intensity` values, from which interventions are drawn.
        options: `guidance_scale`, `cfg_scale`, `num_inference_steps`, `abduction_refinement_steps`.
    """
    parents = {name: factual[name] for name in pipe.causal_graph.image_parents}
    requests = intervention_requests(pipe.causal_graph, factual, pool, seed)
    result = {"factual": judge(images, factual, oracle, judges, pipe)}
    for variable, expected, counterfactuals, back in counterfactuals_by_request(
        pipe, images, parents, requests, **options
    ):
        entry = judge(counterfactuals, expected, oracle, judges, pipe)
        entry["unchanged image"] = judge(images, expected, oracle, judges)
        entry["realism"] = realism(oracle, counterfactuals, images)
        entry["reversibility"] = {
            "benchmark_l1": float(composition_l1(back, images).mean()),
            "l1_grey_levels": grey_level_l1(back, images),
        }
        if vae is not None and variable == "digit":
            labels, targets = torch.as_tensor(factual["digit"]), torch.as_tensor(expected["digit"])
            entry["cld"] = minimality(vae, images, counterfactuals, labels, targets)
        if variable in GROUND_TRUTH:
            truth = ground_truth_counterfactuals(images, expected["thickness"], expected["intensity"])
            entry["ground_truth_l1"] = grey_level_l1(counterfactuals, truth)
            entry["unchanged image"]["ground_truth_l1"] = grey_level_l1(images, truth)
            entry[GROUND_TRUTH_READING] = judge(truth, expected, oracle, judges)
        result[f"do({variable})"] = entry
    return result


def generation_fidelity(
    pipe, oracle, factual: dict, judges=None, cfg_scales=(1.0, None), num_inference_steps: int = 25, seed: int = 0
) -> dict[str, dict]:
    """[`metrics.generation_fidelity`] of one image per held-out digit under that digit's parents, read by every
    family of judges against those parents."""
    parents = {name: factual[name] for name in pipe.causal_graph.image_parents}
    return generation_fidelity_of(
        pipe, parents, lambda images: judge(images, factual, oracle, judges), cfg_scales, num_inference_steps, seed
    )


def composition(pipe, images: torch.Tensor, factual: dict, cycles: int = 10, **options) -> dict:
    """The benchmark's composition ([`metrics.composition`]): the benchmark's L1 (padded 32x32, grey levels) and the
    28x28 grey-level L1 after 1 and `cycles` cycles."""
    parents = {name: factual[name] for name in pipe.causal_graph.image_parents}
    return metrics_composition(pipe, images, parents, cycles, benchmark_distances, **options)


def benchmark_distances(current: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    return {
        "benchmark_l1": float(composition_l1(current, images).mean()),
        "l1_grey_levels": grey_level_l1(current, images),
    }


def morphometrics_agreement(images: torch.Tensor, factual: dict) -> dict:
    """How well the morphometrics recover the sampled values of the data (MAE and correlation)."""
    measured = morphometrics.measure(images)
    return {
        name: {
            "mae": float(np.abs(measured[name] - factual[name]).mean()),
            "bias": float((measured[name] - factual[name]).mean()),
            "correlation": float(np.corrcoef(measured[name], factual[name])[0, 1]),
        }
        for name in ("thickness", "intensity")
    }


# Melistas et al. 2024, Morpho-MNIST (60k training images, 32x32, their judges): VAE / HVAE / GAN
PUBLISHED = {
    "thickness_mae": (0.109, 0.086, 0.228),
    "intensity_mae": (5.33, 3.52, 15.14),
    "digit_accuracy": (0.775, 0.972, 0.451),
    "composition_1": (2.600, 0.438, 3.807),
    "composition_10": (7.698, 1.550, 11.697),
}


def headline(result: dict, family: str) -> dict[str, float]:
    """The benchmark table's numbers for one family of judges (composition is judge-free): composition after each
    cycle count that was run (`composition_1`, `composition_N`)."""
    return {
        "thickness_mae": result["do(thickness)"][family]["thickness_mae"],
        "intensity_mae": result["do(intensity)"][family]["intensity_mae"],
        "digit_accuracy": result["do(digit)"][family]["digit_accuracy"],
        **{key.replace("cycles", "composition"): run["benchmark_l1"] for key, run in result["composition"].items()},
    }


def report(result: dict) -> str:
    """The Markdown report of `diffscm evaluate-scm`: the headline table beside the published one, side effects,
    every family's full table, reversibility and the rest."""
    settings = result["settings"]
    rows = [
        ("thickness MAE under do(thickness), px ↓", "thickness_mae", "{:.3f}"),
        ("intensity MAE under do(intensity), grey levels ↓", "intensity_mae", "{:.2f}"),
        ("digit accuracy under do(digit) ↑", "digit_accuracy", "{:.3f}"),
        ("composition L1, 1 cycle (padded 32x32, grey levels) ↓", "composition_1", "{:.3f}"),
    ]
    for cycles in (key.removeprefix("cycles_") for key in result["composition"] if key != "cycles_1"):
        rows.append((f"composition L1, {cycles} cycles ↓", f"composition_{cycles}", "{:.3f}"))
    families = [f for f in ("benchmark", "benchmark (batch statistics)") if f in result["factual"]]
    lines = [
        f"{settings['num_images']} held-out Morpho-MNIST digits (after the first "
        f"{settings['skipped_heldout_images']}), {settings['model']} ({settings['mechanism']} mechanism), "
        f"anti-causal guidance {settings['guidance_scale']}"
        f"{'' if settings.get('hold_unchanged_parents', True) else ' (only on the parents that change)'}, "
        f"classifier-free guidance {settings['cfg_scale']}, {settings['num_inference_steps']} steps "
        f"({settings.get('integrator', 'ddim')}), {settings['abduction_refinement_steps']} abduction refinement "
        "pass(es) per step "
        f"({settings['unet_evaluations_per_counterfactual']:.0f} UNet evaluations per counterfactual).",
        "",
    ]
    headline_rows = [
        [
            label,
            *(f"**{fmt.format(headline(result, f)[key])}**" for f in families),
            *((fmt.format(value) for value in PUBLISHED[key]) if key in PUBLISHED else ["-"] * 3),
        ]
        for label, key, fmt in rows
    ]
    lines.append(
        markdown_table(["metric", *(f"diffscm, {f} judges" for f in families), "VAE", "HVAE", "GAN"], headline_rows)
    )
    lines += [
        "",
        "Published: Melistas et al. 2024, trained on the full Morpho-MNIST (60,000 images) at 32x32 and scored by "
        f"these judges as their script ran them; diffscm: {settings['training_images']}, at 28x28. Composition after "
        f"{settings['composition_images']} digits.",
        "",
        "Side effects (a variable that the intervention should not move, scored against its factual value):",
        "",
    ]
    side_effects = []
    for family in result["factual"]:
        if family.startswith("predictor"):
            continue
        do_t, do_i, do_d = (result[f"do({v})"][family] for v in PARENTS)
        side_effects.append(
            [
                family,
                f"{do_i['thickness_mae']:.3f}",
                f"{do_d['intensity_mae']:.2f}",
                f"{do_d['thickness_mae']:.3f}",
                f"{do_t['digit_accuracy']:.3f} / {do_i['digit_accuracy']:.3f}",
            ]
        )
    for family in result["do(intensity)"].get(GROUND_TRUTH_READING, {}):
        do_t, do_i = (result[f"do({v})"][GROUND_TRUTH_READING][family] for v in GROUND_TRUTH)
        side_effects.append(
            [
                f"{family}, on the {GROUND_TRUTH_READING} (the floor)",
                f"{do_i['thickness_mae']:.3f}",
                "-",
                "-",
                f"{do_t['digit_accuracy']:.3f} / {do_i['digit_accuracy']:.3f}",
            ]
        )
    side_effect_header = [
        "family",
        "thickness moved by do(intensity), px",
        "intensity moved by do(digit)",
        "thickness moved by do(digit)",
        "digit kept under do(thickness) / do(intensity)",
    ]
    lines.append(markdown_table(side_effect_header, side_effects))
    lines += generation_table(result.get("generation_fidelity", {}), settings)
    lines += [
        "",
        "Every intervention against every reading (the unchanged factual image is the do-nothing baseline, the "
        "ground-truth counterfactual drawn by the data's own process what a perfect one would score):",
        "",
    ]
    lines += full_table(result)
    lines.append("")
    for variable in PARENTS:
        entry = result[f"do({variable})"]
        extra = (
            f", CLD paper / benchmark {entry['cld']['paper']:.3f} / {entry['cld']['benchmark']:.3f}"
            if "cld" in entry
            else ""
        )
        truth = (
            f", L1 to the ground-truth counterfactual {entry['ground_truth_l1']:.2f} (unchanged image: "
            f"{entry['unchanged image']['ground_truth_l1']:.2f})"
            if "ground_truth_l1" in entry
            else ""
        )
        lines.append(
            f"- do({variable}): FD (oracle features) {entry['realism']['frechet_distance']:.2f}; reversibility "
            f"(do(v*) then do(v = factual)) L1 {entry['reversibility']['benchmark_l1']:.2f} (padded) / "
            f"{entry['reversibility']['l1_grey_levels']:.2f} (28x28){truth}{extra}."
        )
    agreement = result["morphometrics_agreement"]
    lines.append(
        f"- Morphometrics of the factual digits against the data's sampled values: thickness MAE "
        f"{agreement['thickness']['mae']:.3f} px (r = {agreement['thickness']['correlation']:.3f}), intensity MAE "
        f"{agreement['intensity']['mae']:.2f} (r = {agreement['intensity']['correlation']:.4f})."
    )
    for family, row in result["factual"].items():
        lines.append(
            f"- {family} on the factual digits: thickness MAE {row['thickness_mae']:.3f}, intensity MAE "
            f"{row['intensity_mae']:.2f}, digit accuracy {row['digit_accuracy']:.3f} (the floor of each row above)."
        )
    lines.append("")
    return "\n".join(lines)


def generation_table(fidelity: dict, settings: dict) -> list[str]:
    """The mechanism's own fidelity: fresh noise under held-out parents, every family's reading."""
    if not fidelity:
        return []
    rows = [
        [scale, family, f"{row['thickness_mae']:.3f}", f"{row['intensity_mae']:.2f}", f"{row['digit_accuracy']:.3f}"]
        for scale, families in fidelity.items()
        for family, row in families.items()
        if not family.startswith("predictor")
    ]
    header = ["classifier-free guidance", "family", "thickness MAE", "intensity MAE", "digit accuracy"]
    return [
        "",
        f"The mechanism alone (fresh noise, the parents of the same held-out digits, no abduction, no anti-causal "
        f"guidance, {settings.get('generation_steps', 25)} DDIM steps), read against those parents:",
        "",
        markdown_table(header, rows, [False, False, True, True, True]),
    ]


def full_table(result: dict) -> list[str]:
    rows = []
    for variable in PARENTS:
        entry = result[f"do({variable})"]
        readings = [(f"do({variable})", entry)]
        readings += [
            (f"do({variable}), {label}", entry.get(baseline, {}))
            for baseline, label in (
                ("unchanged image", "image unchanged"),
                (GROUND_TRUTH_READING, GROUND_TRUTH_READING),
            )
        ]
        for name, families in readings:
            rows += [
                [
                    name,
                    family,
                    f"{row['thickness_mae']:.3f}",
                    f"{row['intensity_mae']:.2f}",
                    f"{row['digit_accuracy']:.3f}",
                ]
                for family, row in families.items()
                if isinstance(row, dict) and "thickness_mae" in row
            ]
    header = ["intervention", "family", "thickness MAE", "intensity MAE", "digit accuracy"]
    return markdown_table(header, rows, [False, False, True, True, True]).split("\n")
