"""The structural causal model of a Diff-SCM pipeline: its causal graph and the mechanisms of its non-image nodes.

Every non-image node v has an invertible mechanism v = f_v(pa_v, u_v), so its exogenous noise u_v can be abducted
from the factual values; the image node's mechanism is the diffusion model, and its parents act through the
anti-causal predictors. A counterfactual is abduction (u of every node), action (do(v = value)) and prediction
(the descendants recomputed from the abducted noise, in causal order).
"""

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

NODE_TYPES = ("categorical", "continuous", "image")
MECHANISMS = ("identity", "affine", "logistic")


@dataclass(frozen=True)
class Mechanism:
    """
    v = f(pa, u) for a scalar node, invertible in u.

    - `identity`: v = u (a root node: its value is its own noise).
    - `affine`: v = bias + sum_p weights[p] * p + scale * u.
    - `logistic`: v = low + (high - low) * sigmoid(bias + sum_p weights[p] * p + scale * u); Morpho-MNIST's intensity
      is `logistic` with low 64, high 255, weights {thickness: 2}, bias -5, scale 0.5.
    """

    kind: str = "identity"
    weights: dict[str, float] = field(default_factory=dict)
    bias: float = 0.0
    scale: float = 1.0
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.kind not in MECHANISMS:
            raise ValueError(f"Unknown mechanism {self.kind!r}; use one of {MECHANISMS}.")
        if self.kind != "identity" and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"A {self.kind} mechanism needs a noise scale > 0, got {self.scale}.")
        if self.kind == "logistic" and not (self.low is not None and self.high is not None and self.low < self.high):
            raise ValueError(f"A logistic mechanism needs low < high, got {self.low} and {self.high}.")

    def _linear(self, parents: dict[str, np.ndarray]) -> np.ndarray:
        return self.bias + sum(weight * np.asarray(parents[name], float) for name, weight in self.weights.items())

    def __call__(self, parents: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
        """The node's value from its parents' values and its noise."""
        noise = np.asarray(noise, float)
        if self.kind == "identity":
            return noise
        pre = self._linear(parents) + self.scale * noise
        if self.kind == "affine":
            return pre
        return self.low + (self.high - self.low) / (1 + np.exp(-pre))

    def abduct(self, parents: dict[str, np.ndarray], value: np.ndarray) -> np.ndarray:
        """The noise u with f(parents, u) = value (the inverse in u)."""
        value = np.asarray(value, float)
        if self.kind == "identity":
            return value
        if self.kind == "logistic":
            if np.any(value < self.low) or np.any(value > self.high):
                raise ValueError(f"A logistic mechanism's values lie in [{self.low}, {self.high}].")
            fraction = np.clip((value - self.low) / (self.high - self.low), 1e-6, 1 - 1e-6)
            value = np.log(fraction / (1 - fraction))
        return (value - self._linear(parents)) / self.scale

    @classmethod
    def fit(
        cls,
        kind: str,
        value: np.ndarray,
        parents: dict[str, np.ndarray],
        low: float | None = None,
        high: float | None = None,
    ) -> "Mechanism":
        """Least-squares fit of an `affine` or `logistic` (given `low`, `high`) mechanism to observed data; the noise
        scale is the residuals' standard deviation, so abducted noise is standard normal on the fitted data."""
        if kind not in ("affine", "logistic"):
            raise ValueError(f"Only affine and logistic mechanisms are fitted, not {kind!r}.")
        value = np.asarray(value, float)
        if kind == "logistic":
            span = high - low
            fraction = np.clip((value - low) / span, 1e-4, 1 - 1e-4)
            value = np.log(fraction / (1 - fraction))
        names = sorted(parents)
        design = np.column_stack([np.asarray(parents[name], float) for name in names] + [np.ones_like(value)])
        coefficients, *_ = np.linalg.lstsq(design, value, rcond=None)
        residual_std = float(np.std(value - design @ coefficients)) or 1.0
        weights = {name: float(w) for name, w in zip(names, coefficients[:-1], strict=True)}
        return cls(kind, weights, float(coefficients[-1]), residual_std, low, high)


@dataclass(frozen=True)
class Node:
    """
    One variable of the causal graph.

    Args:
        name: the node's name, used in interventions (`{"thickness": 4.0}`).
        type: `"categorical"` (values 0..num_classes-1), `"continuous"` (values in `range`) or `"image"`.
        parents: names of the node's direct causes.
        num_classes: number of classes of a categorical node.
        range: `(low, high)` of a continuous node; interventions outside it are refused.
        mechanism: the invertible mechanism of a non-image node (default: identity, for root nodes).
        column: the data set column that holds the node's values (default: its name).
    """

    name: str
    type: str
    parents: tuple[str, ...] = ()
    num_classes: int | None = None
    range: tuple[float, float] | None = None
    mechanism: Mechanism = field(default_factory=Mechanism)
    column: str | None = None

    @classmethod
    def from_dict(cls, spec: dict) -> "Node":
        spec = dict(spec)
        mechanism = spec.pop("mechanism", None) or {}
        unknown = set(spec) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"Node {spec.get('name')!r} has unknown fields {sorted(unknown)}.")
        missing = [name for name in ("name", "type") if name not in spec]
        if missing:
            raise ValueError(
                f'Node {spec.get("name", spec)!r} needs {" and ".join(missing)} (e.g. "type": "categorical").'
            )
        if "range" in spec and spec["range"] is not None:
            spec["range"] = tuple(float(v) for v in spec["range"])
        return cls(**spec | {"parents": tuple(spec.get("parents", ())), "mechanism": Mechanism(**mechanism)})

    def to_dict(self) -> dict:
        spec = asdict(self) | {"parents": list(self.parents)}
        spec["range"] = list(self.range) if self.range is not None else None
        return {k: v for k, v in spec.items() if v is not None}

    @property
    def data_column(self) -> str:
        return self.column or self.name


class CausalGraph:
    """
    A declarative causal graph: nodes with parents, types and mechanisms, exactly one of them the image.

    Saved as a list of node dicts in the pipeline's `model_index.json`, so a checkpoint knows its own SCM.

    Examples:
    ```py
    >>> graph = CausalGraph.morphomnist()
    >>> graph.counterfactual({"thickness": [2.0], "intensity": [150.0], "digit": [7]}, {"thickness": 4.0})
    {'thickness': array([4.]), 'intensity': array([250.8...]), 'digit': array([7])}
    ```
    """

    def __init__(self, nodes: list[Node | dict]):
        self.nodes = {}
        for node in nodes:
            node = node if isinstance(node, Node) else Node.from_dict(node)
            if node.name in self.nodes:
                raise ValueError(f"Node {node.name!r} appears twice in the causal graph.")
            self.nodes[node.name] = node
        self._validate()
        self.order = self._topological_order()

    @classmethod
    def single_parent(cls, name: str = "label", num_classes: int = 10, column: str | None = None) -> "CausalGraph":
        """The simplest graph: one categorical parent -> image (the MNIST digit -> image)."""
        parent = Node(name, "categorical", num_classes=num_classes, column=column)
        return cls([parent, Node("image", "image", parents=(name,))])

    @classmethod
    def morphomnist(cls) -> "CausalGraph":
        """Morpho-MNIST (Pawlowski et al. 2020): thickness -> intensity; thickness, intensity, digit -> image."""
        intensity = Mechanism("logistic", {"thickness": 2.0}, bias=-5.0, scale=0.5, low=64.0, high=255.0)
        return cls(
            [
                Node("thickness", "continuous", range=(0.5, 6.0)),
                Node("intensity", "continuous", ("thickness",), range=(64.0, 255.0), mechanism=intensity),
                Node("digit", "categorical", num_classes=10, column="label"),
                Node("image", "image", ("thickness", "intensity", "digit")),
            ]
        )

    @classmethod
    def load(cls, spec: str) -> "CausalGraph":
        """A named preset (`"morphomnist"`, or `"digit"`: MNIST's label -> image) or a JSON file holding
        `{"nodes": [...]}`."""
        if spec == "morphomnist":
            return cls.morphomnist()
        if spec == "digit":
            return cls.single_parent("digit", 10, column="label")
        with open(spec, encoding="utf-8") as f:
            return cls.from_config(json.load(f))

    @classmethod
    def from_config(cls, config: dict | list) -> "CausalGraph":
        """From `{"nodes": [node dicts]}` (as saved in `model_index.json`) or the list of node dicts."""
        if isinstance(config, dict):
            if set(config) != {"nodes"}:
                raise ValueError(f"A causal graph config is {{'nodes': [...]}}, got keys {sorted(config)}.")
            config = config["nodes"]
        if not isinstance(config, list | tuple) or not all(isinstance(node, dict | Node) for node in config):
            raise ValueError("A causal graph config lists its nodes as dicts.")
        return cls(list(config))

    def to_config(self) -> dict:
        return {"nodes": [node.to_dict() for node in self.nodes.values()]}

    @property
    def image(self) -> Node:
        return next(node for node in self.nodes.values() if node.type == "image")

    @property
    def image_parents(self) -> tuple[str, ...]:
        return self.image.parents

    @property
    def variables(self) -> list[str]:
        """The non-image nodes, causes before effects."""
        return [name for name in self.order if self.nodes[name].type != "image"]

    @property
    def edges(self) -> list[str]:
        return [f"{parent} -> {node.name}" for node in self.nodes.values() for parent in node.parents]

    @property
    def data_columns(self) -> dict[str, str]:
        """{parent of the image: the data set column that holds its values}."""
        return {name: self.nodes[name].data_column for name in self.image_parents}

    def parent_specs(self) -> dict[str, dict]:
        """The image's parents as model specs: `{"type": "categorical", "num_classes": K}` or
        `{"type": "continuous", "range": [low, high]}`."""
        specs = {}
        for name in self.image_parents:
            node = self.nodes[name]
            if node.type == "categorical":
                specs[name] = {"type": "categorical", "num_classes": node.num_classes}
            else:
                specs[name] = {"type": "continuous", "range": list(node.range)}
        return specs

    def data_values(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """The values of the image's parents in data set rows, read from each node's column."""
        return {name: np.array([row[self.nodes[name].data_column] for row in rows]) for name in self.image_parents}

    def descendants(self, name: str) -> set[str]:
        found = {child for child, node in self.nodes.items() if name in node.parents}
        for child in list(found):
            found |= self.descendants(child)
        return found

    def check_value(self, name: str, value) -> np.ndarray:
        """`value` (a number or one per image) as an array, or a clear error for a wrong node, type or range."""
        if name not in self.nodes or self.nodes[name].type == "image":
            raise ValueError(f"Unknown variable {name!r}; this causal graph's variables are {self.variables}.")
        node = self.nodes[name]
        array = np.asarray(value)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"{name!r} takes numbers, got {value!r}.")
        if array.dtype == bool or np.iscomplexobj(array):
            raise TypeError(f"{name!r} takes real numbers, got {value!r}.")
        if array.ndim > 1:
            raise ValueError(f"{name!r} takes a number or one value per image, got shape {array.shape}.")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name!r} must be finite, got {value!r}.")
        if node.type == "categorical":
            if not np.all(array == np.round(array)) or np.any(array < 0) or np.any(array >= node.num_classes):
                raise ValueError(
                    f"{name!r} is categorical: class indices in [0, {node.num_classes - 1}], got {value!r}."
                )
            return array.astype(np.int64)
        low, high = node.range
        if np.any(array < low) or np.any(array > high):
            raise ValueError(f"{name!r} must lie in its range [{low}, {high}], got {value!r}.")
        return array.astype(np.float64)

    def counterfactual(self, factual: dict, intervention: dict) -> dict[str, np.ndarray]:
        """
        Abduction, action, prediction for the non-image nodes: do(intervention), then every descendant recomputed by
        its mechanism from its abducted noise (do(thickness) changes intensity); the rest keep their factual values.
        Values are numbers or one per image; factual values are needed only where they are used.
        """
        factual = {name: self.check_value(name, value) for name, value in factual.items()}
        intervention = {name: self.check_value(name, value) for name, value in intervention.items()}
        changed = set().union(*(self.descendants(name) for name in intervention))
        values = {}
        for name in self.variables:
            node = self.nodes[name]
            if name in intervention:
                value = intervention[name]
            elif name in changed:
                missing = [n for n in (name, *node.parents) if n not in factual]
                if missing:
                    raise ValueError(
                        f"The factual values of {missing} are needed to abduct the noise of {name!r}, which "
                        f"do({', '.join(intervention)}) changes: give them."
                    )
                value = node.mechanism(values, node.mechanism.abduct(factual, factual[name]))
            elif name in factual:
                value = factual[name]
            else:
                continue
            values[name] = np.round(value).astype(np.int64) if node.type == "categorical" else value
        size = max(np.size(v) for v in values.values())
        return {name: np.broadcast_to(v, (size,)).copy() for name, v in values.items()}

    def _validate(self):
        images = [node.name for node in self.nodes.values() if node.type == "image"]
        if len(images) != 1:
            raise ValueError(f"A causal graph needs exactly one image node, got {images}.")
        for node in self.nodes.values():
            if node.type not in NODE_TYPES:
                raise ValueError(f"Node {node.name!r} has unknown type {node.type!r}; use one of {NODE_TYPES}.")
            for parent in node.parents:
                if parent not in self.nodes:
                    raise ValueError(f"Node {node.name!r} has an unknown parent {parent!r}.")
                if self.nodes[parent].type == "image":
                    raise ValueError(f"The image cannot cause {node.name!r}: the image node must be a sink.")
            if node.type == "categorical" and (node.num_classes is None or node.num_classes < 2):
                raise ValueError(f"Categorical node {node.name!r} needs num_classes >= 2.")
            if node.type == "continuous" and (node.range is None or not node.range[0] < node.range[1]):
                raise ValueError(f"Continuous node {node.name!r} needs a range (low, high) with low < high.")
            self._validate_mechanism(node)
        if not self.image.parents:
            raise ValueError("The image node needs at least one parent to intervene on.")

    def _validate_mechanism(self, node: Node):
        mechanism = node.mechanism
        if node.type == "image" or not node.parents:
            if mechanism.kind != "identity" and node.type == "image":
                raise ValueError("The image's mechanism is the diffusion model; give it no mechanism.")
            if mechanism.weights:
                raise ValueError(f"Root node {node.name!r} has mechanism weights for parents it does not have.")
            return
        if node.type == "categorical":
            raise ValueError(f"Categorical node {node.name!r} with parents has no invertible mechanism here.")
        if mechanism.kind == "identity":
            raise ValueError(
                f"Node {node.name!r} has parents {list(node.parents)}: give it an affine or logistic "
                "mechanism (or fit one with Mechanism.fit)."
            )
        if set(mechanism.weights) != set(node.parents):
            raise ValueError(
                f"The mechanism of {node.name!r} weighs {sorted(mechanism.weights)}, but its parents are "
                f"{sorted(node.parents)}."
            )

    def _topological_order(self) -> list[str]:
        order, visiting = [], set()

        def visit(name, path):
            if name in order:
                return
            if name in visiting:
                raise ValueError(f"The causal graph has a cycle: {' -> '.join(path + [name])}.")
            visiting.add(name)
            for parent in self.nodes[name].parents:
                visit(parent, path + [name])
            visiting.discard(name)
            order.append(name)

        for name in self.nodes:
            visit(name, [])
        return order

    def __repr__(self) -> str:
        return f"CausalGraph({', '.join(self.edges)})"
