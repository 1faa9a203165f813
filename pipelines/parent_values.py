"""The causal graph's side of DiffSCMPipeline: the values of the image's parents (given, read from the image by the
anti-causal predictor, or class targets) and the guidance scales of each parent."""

import numpy as np
import torch

from diffscm.folder_format import per_parent

from .checks import ScaleInput, check_scale, class_targets

TargetInput = int | str | list | np.ndarray | torch.Tensor
ValuesInput = dict[str, float | int | list | np.ndarray | torch.Tensor]


class ParentValuesMixin:
    """What a pipeline with a `causal_graph`, an optional anti-causal `classifier` and `parent_embedding`, and the
    `guidance_scale`, `cfg_scale` and `explained_classifier_scale` defaults in its config knows of parent values."""

    def read_parents(self, sample: torch.Tensor) -> dict[str, np.ndarray]:
        """The anti-causal predictor's point estimates of the image's parents from clean samples (empty without)."""
        if self.classifier is None:
            return {}
        estimates = self.classifier.predict(sample.to(self.classifier.dtype), 0)
        return {name: value.detach().cpu().numpy() for name, value in estimates.items()}

    def target_probabilities(self, clean: torch.Tensor, targets, explained=None) -> np.ndarray | None:
        """p(target | x_0) of clean counterfactuals by the `explained` classifier, or else the anti-causal
        predictor; None without targets or without either."""
        if targets is None or (explained is None and self.classifier is None):
            return None
        targets = targets.flatten().to(clean.device)
        if explained is not None:
            log_prob = explained.log_prob(clean, targets)
        else:
            parent = self.single_categorical_parent()
            log_prob = self.classifier.log_likelihood(clean.to(self.classifier.dtype), 0, {parent: targets})[parent]
        return log_prob.exp().float().cpu().numpy()

    def read_back(self, counterfactuals: torch.Tensor, targets, explained=None) -> dict:
        """The output fields read from the counterfactuals: the anti-causal predictor's `predicted_values`, and with
        `target=` the flat `targets` and their `target_probabilities`."""
        clean = counterfactuals.clamp(-1, 1)
        return {
            "predicted_values": self.read_parents(clean),
            "targets": None if targets is None else targets.flatten().numpy(),
            "target_probabilities": self.target_probabilities(clean, targets, explained),
        }

    def act(self, factual: dict, intervention: dict, repeats: int) -> dict[str, np.ndarray]:
        """Action: do(`intervention`) on the causal graph for each factual image repeated `repeats` times, the
        descendants recomputed by their mechanisms from their abducted noise."""
        return self.causal_graph.counterfactual({n: np.repeat(v, repeats) for n, v in factual.items()}, intervention)

    def infer_factual_values(self, sample: torch.Tensor, given: ValuesInput | None) -> tuple[dict, list[str]]:
        """Factual values: those `given`, and the image's parents not given predicted from the clean image by the
        anti-causal predictor (conditions from the given values). Returns the values and the predicted names."""
        graph, size = self.causal_graph, sample.shape[0]
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"`factual_values` must be a dict {{variable: value}}, got {given!r}.")
        values = {name: self._per_image(name, value, size, observed=True) for name, value in (given or {}).items()}
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
                estimate, node = estimates[name].float().cpu().numpy(), graph.nodes[name]
                categorical = node.type == "categorical"
                values[name] = estimate.astype(np.int64) if categorical else np.clip(estimate, *node.range)
        return values, predicted

    def _per_image(self, name: str, value, size: int, observed: bool = False) -> np.ndarray:
        value = value.cpu() if isinstance(value, torch.Tensor) else value
        array = self.causal_graph.check_value(name, value, observed)
        if array.ndim == 1 and len(array) != size:
            raise ValueError(f"{name!r} has {len(array)} values for {size} images.")
        return np.broadcast_to(array, (size,)).copy()

    def single_categorical_parent(self) -> str:
        """The image's only parent, for the `target=` shorthand."""
        parents = self.causal_graph.image_parents
        if len(parents) != 1 or self.causal_graph.nodes[parents[0]].type != "categorical":
            raise ValueError(
                f"`target` is shorthand for an image with one categorical parent; this graph's image has parents "
                f"{list(parents)}: use `intervention={{{parents[0]!r}: value}}` in Python or "
                f"`--intervention {parents[0]}=VALUE` on the command line."
            )
        return parents[0]

    def guidance_scales(self, guidance_scale: ScaleInput | None = None, explained: bool = False) -> dict[str, float]:
        """The anti-causal guidance scale of every parent of the image: the given one(s) over the defaults; with an
        `explained` classifier, the categorical parent's defaults to `explained_classifier_scale` and guides through
        that classifier."""
        parents = self.causal_graph.image_parents
        default = self.config.guidance_scale
        if explained:
            parent = self.single_categorical_parent()
            default = {parent: self.config.explained_classifier_scale}
        scales = per_parent("guidance_scale", parents, default, guidance_scale, 0.0, check_scale)
        unguided = {k: v for k, v in scales.items() if not (explained and k == self.single_categorical_parent())}
        if self.classifier is None and any(unguided.values()):
            raise ValueError("This pipeline has no anti-causal predictor: `guidance_scale` must be 0.")
        return scales

    def cfg_scales(self, cfg_scale: ScaleInput | None = None) -> dict[str, float]:
        """The classifier-free guidance scale of every parent of the image: the given one(s) over the defaults."""
        parents = self.causal_graph.image_parents
        scales = per_parent("cfg_scale", parents, self.config.cfg_scale, cfg_scale, 1.0, check_scale)
        if self.parent_embedding is None and any(scale != 1 for scale in scales.values()):
            raise ValueError("`cfg_scale` needs a conditional mechanism (a `parent_embedding`); this one has none.")
        return scales

    def prepare_targets(self, target: TargetInput, batch_size: int) -> torch.Tensor:
        """Validated targets as a `(batch_size, K)` long tensor."""
        node = self.causal_graph.nodes[self.single_categorical_parent()]
        if node.classes is not None and not (isinstance(target, str) and target == "all"):
            target = _class_indices(node, target)
        return class_targets(target, batch_size, node.num_classes)

    def parent_tensors(self, values: dict) -> dict[str, torch.Tensor]:
        """Values of the image's parents already checked at the public entry (one per sample) as tensors on the
        execution device."""
        return {
            name: torch.as_tensor(values[name], device=self._execution_device)
            for name in self.causal_graph.image_parents
        }

    def prepare_parent_values(self, values: TargetInput | ValuesInput, batch_size: int) -> dict[str, torch.Tensor]:
        """Validated values of every parent of the image, one per sample, as tensors on the execution device."""
        parents = self.causal_graph.image_parents
        if not isinstance(values, dict):
            targets = self.prepare_targets(values, batch_size)
            if targets.shape[1] != 1:
                raise ValueError("`intervene` takes one target per sample (`Abduction.repeat_interleave` gives more).")
            values = {self.single_categorical_parent(): targets[:, 0]}
        if set(values) != set(parents):
            raise ValueError(f"The values of all the image's parents {list(parents)} are needed: {sorted(values)}.")
        return {
            name: torch.as_tensor(self._per_image(name, value, batch_size), device=self._execution_device)
            for name, value in values.items()
        }


def _class_indices(node, target):
    """Class names in `target` (one, or a list per image) as the node's class indices; anything else as it is."""
    if isinstance(target, str):
        return node.class_index(target)
    if isinstance(target, list | tuple):
        return [_class_indices(node, t) for t in target]
    return target
