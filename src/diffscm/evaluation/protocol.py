"""The evaluation protocol for any causal graph: one do() per parent of the image, scored by independent judges.

Each parent v of the image is intervened on once per held-out image: a categorical one to another class drawn at
random, a continuous one to a value drawn uniformly from its range (independent of the order of the held-out images,
which a data set may sort by class); the descendants follow the graph's mechanisms. Every counterfactual is read by
the judges and scored against the counterfactual values of all the image's parents: the intervened one gives
effectiveness, its descendants whether they followed, the others the side effects. Beside each score stands the
unchanged image's, against the same values (what doing nothing scores), and the judges' own error on real held-out
images is reported once. Composition (the null intervention applied 1 and N times), reversibility (do(v*) then
do(v = factual) from the counterfactual's own abduction), realism (Frechet distance and KID in the judges'
features) and the mechanism's own fidelity (images from fresh noise under the held-out parents) complete it. A data
set whose do() has an exact ground truth passes `ground_truth` (Colour-MNIST: the same digit recoloured).
"""

from collections.abc import Callable

import numpy as np
import torch

from ..tables import markdown_table
from .judges import judge_errors
from .metrics import composition, counterfactuals_by_request, generation_fidelity, grey_level_l1, realism


def intervention_values(graph, factual: dict, seed: int = 0) -> dict[str, dict]:
    """{parent: the counterfactual values of every variable under do(parent)}, one per image."""
    rng = np.random.default_rng(seed)
    requests = {}
    for variable in graph.image_parents:
        node, values = graph.nodes[variable], np.asarray(factual[variable])
        if node.type == "categorical":
            target = (values + rng.integers(1, node.num_classes, len(values))) % node.num_classes
        else:
            target = rng.uniform(*node.range, len(values))
        requests[variable] = graph.counterfactual(factual, {variable: target})
    return requests


@torch.no_grad()
def evaluate(
    pipe,
    judges,
    images: torch.Tensor,
    factual: dict,
    seed: int = 0,
    cycles: int = 10,
    composition_samples: int | None = None,
    ground_truth: dict[str, Callable] | None = None,
    measures: dict[str, Callable] | None = None,
    **options,
) -> dict:
    """
    The protocol on held-out `images` `(B, C, H, W)` in [0, 1] with their `factual` values of every variable.

    Args:
        judges: a [`GraphJudges`] of the image's parents.
        ground_truth: {variable: f(images, expected values) -> the true counterfactual images} where one is known.
        measures: {name: f(images, expected values) -> float}, judge-free readings beside the judges' (Colour-MNIST:
            the hue measured from the pixels); a name starts with the parent it measures (`hue_...`).
        options: `guidance_scale`, `cfg_scale`, `num_inference_steps`, `abduction_refinement_steps`.
    """
    graph, specs = pipe.causal_graph, judges.config.parents
    parents = {name: graph.check_value(name, factual[name], observed=True) for name in graph.image_parents}
    factual_reading = judges.predict(images)
    result = {"judges on the factual images": judge_errors(factual_reading, factual, specs)}
    requests = intervention_values(graph, factual, seed)
    for variable, expected, counterfactuals, back in counterfactuals_by_request(
        pipe, images, parents, requests, **options
    ):
        entry = {
            "descendants": sorted(graph.descendants(variable) & set(graph.image_parents)),
            "counterfactual": _scores(judges.predict(counterfactuals), specs, measures, counterfactuals, expected),
            "unchanged image": _scores(factual_reading, specs, measures, images, expected),
            "realism": realism(judges, counterfactuals, images),
            "reversibility_l1": grey_level_l1(back, images),
        }
        if ground_truth and variable in ground_truth:
            truth = ground_truth[variable](images, expected)
            entry["ground_truth_l1"] = grey_level_l1(counterfactuals, truth)
            entry["unchanged image"]["ground_truth_l1"] = grey_level_l1(images, truth)
        result[f"do({variable})"] = entry
    count = composition_samples or len(images)
    result["composition"] = composition(pipe, images[:count], _first(parents, count), cycles, **options)
    result["generation_fidelity"] = generation_fidelity(
        pipe,
        parents,
        lambda generated: _scores(judges.predict(generated), specs, measures, generated, factual),
        (1.0, options.get("cfg_scale")),
        seed=seed,
    )
    return result


def _scores(reading: dict, specs: dict, measures: dict | None, images: torch.Tensor, expected: dict) -> dict:
    """The judges' `reading` of `images` and each judge-free measure, scored against the expected values."""
    scores = judge_errors(reading, expected, specs)
    return scores | {name: measure(images, expected) for name, measure in (measures or {}).items()}


def _first(values: dict, count: int) -> dict:
    return {name: np.asarray(value)[:count] for name, value in values.items()}


def report(result: dict) -> str:
    """The Markdown report: one table per do(), composition, and what the judges score on real images."""
    lines = [f"# Counterfactuals of {result['num_images']} held-out images of {result['data']}", ""]
    lines += [f"Model `{result['model']}`, judges `{result['judges']}`; settings {result['settings']}.", ""]
    own = result.get("judges_heldout") or result["judges on the factual images"]
    for key, entry in result.items():
        if not key.startswith("do("):
            continue
        variable = key[3:-1]
        lines += [f"## {key}", ""]
        rows = []
        for measure, value in entry["counterfactual"].items():
            role = _role(measure, variable, entry["descendants"])
            floor = f"{own[measure]:.4g}" if measure in own else ""
            rows.append(
                [
                    f"{measure.replace('_', ' ')} ({role})",
                    f"{value:.4g}",
                    f"{entry['unchanged image'][measure]:.4g}",
                    floor,
                ]
            )
        if "ground_truth_l1" in entry:
            rows.append(
                [
                    "L1 to the true counterfactual (grey levels)",
                    f"{entry['ground_truth_l1']:.3f}",
                    f"{entry['unchanged image']['ground_truth_l1']:.3f}",
                    "",
                ]
            )
        rows.append(["reversibility L1 (grey levels)", f"{entry['reversibility_l1']:.3f}", "", ""])
        rows.append(["Frechet distance (judges' features)", f"{entry['realism']['frechet_distance']:.3f}", "", ""])
        rows.append(["KID (judges' features)", f"{entry['realism']['kid']:.4f}", "", ""])
        header = [
            "measure (judged against the counterfactual values)",
            "counterfactual",
            "unchanged image",
            "judges on real held-out images",
        ]
        lines += [markdown_table(header, rows), ""]
    composition_rows = [
        [f"after {key.split('_')[1]} cycle(s)", f"{value:.3f}"] for key, value in result["composition"].items()
    ]
    lines += ["## Composition (null intervention, grey-level L1, 0-255)", ""]
    lines += [markdown_table(["cycles", "L1"], composition_rows), ""]
    return "\n".join(lines + _fidelity_lines(result.get("generation_fidelity"), own))


def _fidelity_lines(fidelity: dict | None, own: dict) -> list[str]:
    """The mechanism alone: images from fresh noise under the held-out images' parents, scored like the others."""
    if not fidelity:
        return []
    scales = list(fidelity)
    rows = [
        [measure.replace("_", " "), *(f"{fidelity[scale][measure]:.4g}" for scale in scales)]
        + [f"{own[measure]:.4g}" if measure in own else ""]
        for measure in fidelity[scales[0]]
    ]
    header = ["measure (judged against the held-out images' values)", *scales, "judges on real held-out images"]
    title = "## The mechanism alone (fresh noise under the held-out images' parents, 25 DDIM steps, no abduction)"
    return [title, "", markdown_table(header, rows), ""]


def _role(measure: str, variable: str, descendants: list[str]) -> str:
    """Whether a measure's parent was intervened on, follows the intervention, or should have been kept."""
    if measure.startswith(f"{variable}_"):
        return "intervened"
    return "follows" if any(measure.startswith(f"{name}_") for name in descendants) else "kept"
