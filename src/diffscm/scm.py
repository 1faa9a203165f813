"""The structural causal model of a Diff-SCM pipeline: its causal graph and the mechanisms of its non-image nodes.

Every non-image node v has an invertible mechanism v = f_v(pa_v, u_v), so its exogenous noise u_v can be abducted
from the factual values; the image node's mechanism is the diffusion model, and its parents act through the
anti-causal predictors. A counterfactual is abduction (u of every node), action (do(v = value)) and prediction
(the descendants recomputed from the abducted noise, in causal order).
"""

import json
import math
import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .flows import abduct as flow_abduct
from .flows import fit as fit_flow
from .flows import forward as flow_forward
from .flows import log_likelihood as flow_log_likelihood

NODE_TYPES = ("categorical", "continuous", "image")
MECHANISMS = ("identity", "affine", "logistic", "flow", "gumbel_max", "auto")
CATEGORICAL_L2 = 1e-3  # the ridge on a gumbel_max mechanism's weights: separable classes still get finite logits
OBSERVED_MARGIN = 0.1  # how far outside a continuous node's range (a fraction of its width) a factual value may lie
FLOW_MARGIN = 0.01  # nats per held-out value a flow must gain over an affine or logistic mechanism to be chosen
MAX_CLASSES = 10_000  # a categorical node's embedding and predictor head grow with it


@dataclass(frozen=True)
class Mechanism:
    """
    v = f(pa, u) for a scalar node, invertible in u.

    - `identity`: v = u (a root node: its value is its own noise).
    - `affine`: v = bias + sum_p weights[p] * p + scale * u.
    - `logistic`: v = low + (high - low) * sigmoid(bias + sum_p weights[p] * p + scale * u); Morpho-MNIST's intensity
      is `logistic` with low 64, high 255, weights {thickness: 2}, bias -5, scale 0.5.

    - `flow`: v = T^-1(u; pa), a conditional neural spline flow (`diffscm.flows`, zuko's NSF) fitted to the data
      where neither fits; `flow` holds it (its parents' encoding and weights).
    - `gumbel_max` (a categorical node with parents): v = argmax_k(bias_k + sum_p weights[p]_k + u_k), u_k standard
      Gumbel (Oberst & Sontag, ICML 2019): `bias` and each weight hold one logit per class (a categorical parent's, one
      row of them per parent class). A class does not fix its noise, so abduction draws u from its posterior given the
      observed class (seeded): the counterfactual class is a draw, and the factual parents give the factual class back.

    A categorical parent enters one-hot, never as its class index: its weight is a list with one entry per class
    (`weights={"digit": [0.05, 0.15, ...]}`), so no order of the classes is implied. `auto` (in a graph file) is
    fitted from the data as whichever of the three has the highest held-out likelihood.
    """

    kind: str = "identity"
    weights: dict[str, float | tuple[float, ...]] = field(default_factory=dict)
    bias: float | tuple[float, ...] = 0.0
    scale: float = 1.0
    low: float | None = None
    high: float | None = None
    flow: dict | None = field(default=None, hash=False, repr=False)

    def __post_init__(self):
        if self.kind not in MECHANISMS:
            raise ValueError(f"Unknown mechanism {self.kind!r}; use one of {MECHANISMS}.")
        if self.kind != "identity" and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"A {self.kind} mechanism needs a noise scale > 0, got {self.scale}.")
        if self.kind == "logistic" and not (self.low is not None and self.high is not None and self.low < self.high):
            raise ValueError(f"A logistic mechanism needs low < high, got {self.low} and {self.high}.")
        object.__setattr__(self, "weights", {name: _tuples(w) for name, w in self.weights.items()})
        object.__setattr__(self, "bias", _tuples(self.bias))
        if isinstance(self.bias, tuple) != (self.kind == "gumbel_max" and bool(self.weights)):
            raise ValueError("A fitted gumbel_max mechanism has one bias per class (a list); the others one number.")

    @property
    def fitted(self) -> bool:
        """Whether the mechanism can run: identity always, a flow with its spec, the others with their weights."""
        return self.kind == "identity" or (self.flow is not None if self.kind == "flow" else bool(self.weights))

    def _linear(self, parents: dict[str, np.ndarray]) -> np.ndarray:
        terms = [
            np.asarray(weight)[np.asarray(parents[name], np.int64)]
            if isinstance(weight, tuple)
            else weight * np.asarray(parents[name], float)
            for name, weight in self.weights.items()
        ]
        return self.bias + sum(terms)

    def _logits(self, parents: dict[str, np.ndarray]) -> np.ndarray:
        """A gumbel_max mechanism's logits `(N, K)`: a categorical parent picks its class's row, a continuous one
        scales its row."""
        size = max([np.size(value) for value in parents.values()] + [1])
        terms = [
            np.asarray(weight)[np.asarray(parents[name], np.int64)]
            if np.ndim(weight) == 2
            else np.asarray(parents[name], float).reshape(-1, 1) * np.asarray(weight)
            for name, weight in self.weights.items()
        ]
        return np.broadcast_to(np.asarray(self.bias) + sum(terms), (size, len(self.bias)))

    def __call__(self, parents: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
        """The node's value from its parents' values and its noise (`gumbel_max`: `(N, K)` Gumbel noise; zeros of
        shape `(N,)` give each row's most likely class)."""
        noise = np.asarray(noise, float)
        if self.kind == "gumbel_max":
            logits = self._logits(parents)
            return np.argmax(logits + (noise if noise.ndim == 2 else 0.0), axis=1)
        if self.kind == "identity":
            return noise
        if self.kind == "flow":
            return flow_forward(self.flow, parents, noise)
        pre = self._linear(parents) + self.scale * noise
        if self.kind == "affine":
            return pre
        return self.low + (self.high - self.low) / (1 + np.exp(-pre))

    def abduct(self, parents: dict[str, np.ndarray], value: np.ndarray, seed: int = 0) -> np.ndarray:
        """The noise u with f(parents, u) = value (the inverse in u); for `gumbel_max`, a draw `(N, K)` of it from
        its posterior given the observed class (`seed`): the top-down Gumbel sampling of Maddison et al. (2014)."""
        if self.kind == "gumbel_max":
            logits = self._logits(parents)
            observed = np.broadcast_to(np.asarray(value, np.int64), (len(logits),))
            gumbel = np.random.default_rng(seed).gumbel(size=(len(logits), logits.shape[1] + 1))
            top = np.logaddexp.reduce(logits, axis=1) + gumbel[:, -1]  # the observed class's perturbed logit
            others = -np.logaddexp(-top[:, None], -(logits + gumbel[:, :-1]))  # each truncated below the top
            rows = np.arange(len(logits))
            others[rows, observed] = top
            return others - logits
        value = np.asarray(value, float)
        if self.kind == "identity":
            return value
        if self.kind == "flow":
            return flow_abduct(self.flow, parents, value)
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
        num_classes: dict[str, int] | None = None,
        classes: int | None = None,
    ) -> "Mechanism":
        """Least-squares fit of an `affine` or `logistic` (given `low`, `high`) mechanism to observed data (the noise
        scale is the residuals' standard deviation, so abducted noise is standard normal on the fitted data), or the
        maximum-likelihood fit of a `flow`, or of a `gumbel_max` over `classes` classes (multinomial logistic
        regression with a small ridge). The parents named in `num_classes` ({parent: K}) are categorical and enter
        one-hot."""
        if kind not in ("affine", "logistic", "flow", "gumbel_max"):
            raise ValueError(f"Only affine, logistic, flow and gumbel_max mechanisms are fitted, not {kind!r}.")
        num_classes = num_classes or {}
        if kind == "flow":
            return cls("flow", flow=fit_flow(value, parents, num_classes))
        names = sorted(parents)
        blocks = [
            np.eye(num_classes[name])[np.asarray(parents[name], np.int64)]
            if name in num_classes
            else np.asarray(parents[name], float)[:, None]
            for name in names
        ]
        design = np.concatenate(blocks + [np.ones((len(value), 1))], axis=1)
        if kind == "gumbel_max":
            return cls._fit_gumbel_max(design, np.asarray(value, np.int64), names, blocks, classes)
        target = cls._link(kind, np.asarray(value, float), low, high)
        coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual_std = float(np.std(target - design @ coefficients)) or 1.0
        weights, start = {}, 0
        for name, block in zip(names, blocks, strict=True):
            width = block.shape[1]
            part = coefficients[start : start + width]
            weights[name] = tuple(map(float, part)) if name in num_classes else float(part[0])
            start += width
        return cls(kind, weights, float(coefficients[-1]), residual_std, low, high)

    @classmethod
    def _fit_gumbel_max(cls, design, value, names, blocks, classes: int) -> "Mechanism":
        """Multinomial logistic regression of `value` on the parents' `design` matrix (their blocks, then a column
        of ones), by L-BFGS with a small ridge on the weights (not the bias)."""
        if not classes or classes < 2 or np.any(value < 0) or np.any(value >= classes):
            raise ValueError(f"A gumbel_max mechanism needs classes >= 2 and class indices below it, got {classes}.")
        from scipy.optimize import minimize
        from scipy.special import log_softmax

        target = np.eye(classes)[value]

        def loss(flat):
            coefficients = flat.reshape(design.shape[1], classes)
            log_p = log_softmax(design @ coefficients, axis=1)
            ridge = CATEGORICAL_L2 * np.sum(coefficients[:-1] ** 2)
            gradient = design.T @ (np.exp(log_p) - target) / len(value)
            gradient[:-1] += 2 * CATEGORICAL_L2 * coefficients[:-1]
            return -np.mean(np.sum(target * log_p, axis=1)) + ridge, gradient.ravel()

        fitted = minimize(loss, np.zeros(design.shape[1] * classes), jac=True, method="L-BFGS-B").x
        coefficients = fitted.reshape(design.shape[1], classes)
        weights, start = {}, 0
        for name, block in zip(names, blocks, strict=True):
            part = coefficients[start : start + block.shape[1]]
            weights[name] = _tuples(part if block.shape[1] > 1 else part[0])  # a categorical parent: a row per class
            start += block.shape[1]
        return cls("gumbel_max", weights, _tuples(coefficients[-1]))

    @staticmethod
    def _link(kind: str, value: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
        if kind != "logistic":
            return value
        fraction = np.clip((value - low) / (high - low), 1e-4, 1 - 1e-4)
        return np.log(fraction / (1 - fraction))

    def log_likelihood(self, parents: dict[str, np.ndarray], value: np.ndarray) -> float:
        """Mean log density of observed values under the mechanism (standard normal noise, change of variables):
        how the training scripts choose between mechanisms on held-out data."""
        if self.kind == "gumbel_max":
            from scipy.special import log_softmax

            log_p = log_softmax(self._logits(parents), axis=1)
            return float(np.mean(log_p[np.arange(len(log_p)), np.asarray(value, np.int64)]))
        value = np.asarray(value, float)
        if self.kind == "flow":
            return flow_log_likelihood(self.flow, parents, value)
        if self.kind == "logistic":
            value = np.clip(value, self.low + 1e-4 * (self.high - self.low), self.high - 1e-4 * (self.high - self.low))
        noise = self.abduct(parents, value)
        log_jacobian = -np.log(self.scale) * np.ones_like(value)
        if self.kind == "logistic":
            fraction = (value - self.low) / (self.high - self.low)
            log_jacobian -= np.log(fraction * (1 - fraction) * (self.high - self.low))
        return float(np.mean(-0.5 * noise**2 - 0.5 * np.log(2 * np.pi) + log_jacobian))


@dataclass(frozen=True)
class Node:
    """
    One variable of the causal graph.

    Args:
        name: the node's name, used in interventions (`{"thickness": 4.0}`).
        type: `"categorical"` (values 0..num_classes-1), `"continuous"` (values in `range`) or `"image"`.
        parents: names of the node's direct causes.
        num_classes: number of classes of a categorical node (default: the number of `classes`).
        classes: the class names of a categorical node (`["red", "green", "blue"]`): the data's strings map through
            them, and interventions, reports and file names use them.
        range: `(low, high)` of a continuous node; interventions outside it are refused. A graph file may leave it
            out: the training scripts then take it from the training data and record it.
        mechanism: the invertible mechanism of a non-image node (default: identity, for root nodes; a graph file's
            node with parents and no fitted mechanism is fitted from the training data).
        column: the data set column that holds the node's values (default: its name).
    """

    name: str
    type: str
    parents: tuple[str, ...] = ()
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    range: tuple[float, float] | None = None
    mechanism: Mechanism = field(default_factory=Mechanism)
    column: str | None = None

    def __post_init__(self):
        if self.classes is not None:
            object.__setattr__(self, "classes", _class_names(self.name, self.classes, self.num_classes))
            object.__setattr__(self, "num_classes", len(self.classes))

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
        name = spec["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f'A node\'s "name" is a non-empty string, got {name!r}.')
        _check_field(name, "type", spec["type"], str, "a string")
        _check_field(name, "parents", spec.get("parents", []), list | tuple, "a list of node names")
        _check_field(name, "column", spec.get("column"), str | None, "a column name")
        _check_field(name, "mechanism", mechanism, dict, 'a dict such as {"kind": "affine"}')
        if spec.get("range") is not None:
            spec["range"] = _finite_pair(name, spec["range"])
        if spec.get("num_classes") is not None and (
            isinstance(spec["num_classes"], bool) or not isinstance(spec["num_classes"], int)
        ):
            raise ValueError(f'Node {name!r}: "num_classes" is an integer, got {spec["num_classes"]!r}.')
        if (spec.get("num_classes") or 0) > MAX_CLASSES:
            raise ValueError(f'Node {name!r}: "num_classes" {spec["num_classes"]} is more than {MAX_CLASSES}.')
        unknown = sorted(set(mechanism) - set(Mechanism.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f'Node {name!r}: "mechanism" has unknown fields {unknown}; it takes '
                f"{list(Mechanism.__dataclass_fields__)} (kind one of {MECHANISMS})."
            )
        _check_field(name, "mechanism weights", mechanism.get("weights", {}), dict, "{parent: weight}")
        try:
            mechanism = Mechanism(**mechanism)
        except (TypeError, ValueError) as error:
            raise ValueError(f'Node {name!r}: "mechanism": {error}') from None
        return cls(**spec | {"parents": tuple(spec.get("parents", ())), "mechanism": mechanism})

    def to_dict(self) -> dict:
        spec = asdict(self) | {"parents": list(self.parents)}
        spec["range"] = list(self.range) if self.range is not None else None
        spec["classes"] = list(self.classes) if self.classes is not None else None
        spec["mechanism"]["weights"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.mechanism.weights.items()
        }
        return {k: v for k, v in spec.items() if v is not None}

    @property
    def data_column(self) -> str:
        return self.column or self.name

    def encode(self, values) -> np.ndarray:
        """A data column's values as numbers: class names map through `classes` (a `ClassLabel` column gives its
        names), class indices and continuous values pass; anything else names the node and the value."""
        array = np.asarray(values)
        if self.type == "continuous":
            if not np.issubdtype(array.dtype, np.number):
                shown = array[:3].tolist()
                raise ValueError(
                    f"Node {self.name!r} is continuous, but its column {self.data_column!r} holds {shown}..."
                )
            return array.astype(np.float64)
        if array.dtype.kind in "US" or array.dtype == object:
            return np.array([self.class_index(value) for value in array.tolist()], dtype=np.int64)
        if array.dtype == bool:
            return array.astype(np.int64)  # False, True: classes 0 and 1
        if array.size and (np.any(array != np.round(array)) or array.min() < 0 or array.max() >= self.num_classes):
            raise ValueError(
                f"Node {self.name!r} is categorical with {self.num_classes} classes, but its column "
                f"{self.data_column!r} holds {sorted(set(array.tolist()))[:10]}: class indices "
                f'0..{self.num_classes - 1} (or names listed in "classes") are needed.'
            )
        return array.astype(np.int64)

    def class_index(self, value) -> int:
        """A categorical value, given by index or by name, as its class index."""
        if isinstance(value, str):
            if self.classes is None:
                if value.isdecimal():
                    return int(value)
                raise ValueError(
                    f'Node {self.name!r} got the class name {value!r}, but the graph lists no "classes" for it: '
                    f'add "classes": [...] to the node.'
                )
            if value not in self.classes:
                raise ValueError(f"Node {self.name!r} has no class {value!r}; its classes are {list(self.classes)}.")
            return self.classes.index(value)
        return value

    def value_name(self, value) -> str:
        """How reports, file names and the web page write a value: a class name, an index, or a number."""
        if self.type == "categorical":
            index = int(value)
            return self.classes[index] if self.classes is not None else str(index)
        return f"{float(value):g}"


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

    def __init__(self, nodes: list[Node | dict], fitted: bool = True):
        self.nodes = {}
        for node in nodes:
            node = node if isinstance(node, Node) else Node.from_dict(node)
            if node.name in self.nodes:
                raise ValueError(f"Node {node.name!r} appears twice in the causal graph.")
            self.nodes[node.name] = node
        self._validate(fitted)
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
        `{"nodes": [...]}`, whose continuous ranges and mechanisms may be left for `fit` to take from the data."""
        if spec == "morphomnist":
            return cls.morphomnist()
        if spec == "digit":
            return cls.single_parent("digit", 10, column="label")
        with open(spec, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{spec} is not JSON: {error}") from None
        return cls.from_config(config, fitted=False)

    @classmethod
    def from_config(cls, config: dict | list, fitted: bool = True) -> "CausalGraph":
        """From `{"nodes": [node dicts]}` (as saved in `model_index.json`) or the list of node dicts; with
        `fitted=False` ranges and mechanisms may still be missing (see `fit`)."""
        if isinstance(config, dict):
            if set(config) != {"nodes"}:
                raise ValueError(f"A causal graph config is {{'nodes': [...]}}, got keys {sorted(config)}.")
            config = config["nodes"]
        if not isinstance(config, list | tuple) or not all(isinstance(node, dict | Node) for node in config):
            raise ValueError("A causal graph config lists its nodes as dicts.")
        return cls(list(config), fitted=fitted)

    @property
    def fitted(self) -> bool:
        """Every continuous node has a range and every node with parents a mechanism with weights."""
        return all(node.range is not None for node in self.nodes.values() if node.type == "continuous") and all(
            node.mechanism.fitted for node in self.nodes.values() if node.parents and node.type != "image"
        )

    @property
    def node_columns(self) -> dict[str, str]:
        """{non-image node: the data set column that holds its values}."""
        return {name: self.nodes[name].data_column for name in self.variables}

    def encode(self, columns: dict[str, list | None]) -> dict[str, np.ndarray]:
        """Each node's values from data set columns ({column: values}; None for a column not needed here), class
        names mapped through `classes`."""
        missing = [
            f"{name} (column {column!r})" for name, column in self.node_columns.items() if column not in columns
        ]
        if missing:
            raise ValueError(
                f"The data has no column for {', '.join(missing)}; its columns are {sorted(columns)}. Rename the "
                'column or give the node a "column".'
            )
        return {name: self.nodes[name].encode(columns[column]) for name, column in self.node_columns.items()}

    def data_values(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """The values of the image's parents in data set rows, read from each node's column, class names encoded."""
        return {
            name: self.nodes[name].encode([row[column] for row in rows]) for name, column in self.data_columns.items()
        }

    def show(self, name: str, value) -> str:
        """A value as reports and the web page write it: a categorical one by its class name, a number to two
        decimals."""
        node = self.nodes.get(name)
        if node is not None and node.type == "categorical" and not isinstance(value, str):
            return node.value_name(value)
        return f"{value:.2f}" if isinstance(value, float | np.floating) else str(value)

    def row_values(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """Every variable's values in data set rows (through `encode`, which names a missing column)."""
        return self.encode({column: [row[column] for row in rows] for column in rows[0]} if rows else {})

    def fit(self, train: dict[str, np.ndarray], heldout: dict[str, np.ndarray] | None = None):
        """
        The graph with what its file left out taken from encoded data ({node: values}): each continuous node's
        missing range (the training values' min and max), and each mechanism of a node with parents: `affine`,
        `logistic` or `flow` as given, or with `"kind": "auto"` (the default) the one of highest held-out
        log-likelihood (a flow only where it gains FLOW_MARGIN over the other two); a categorical node's is
        `gumbel_max`.

        Returns the fitted graph and a report {node: {"kind", "heldout_log_likelihood", "heldout_mae"}} (a
        categorical node's `"heldout_accuracy"` of its most likely class instead of the MAE).
        """
        heldout = heldout if heldout is not None and len(next(iter(heldout.values()), [])) else train
        nodes, report = dict(self.nodes), {}
        for name in self.variables:
            node = nodes[name]
            if node.type == "continuous" and node.range is None:
                node = replace(node, range=(float(np.min(train[name])), float(np.max(train[name]))))
            if node.parents and not node.mechanism.fitted:
                node, report[name] = self._fit_mechanism(node, nodes, train, heldout)
            nodes[name] = node
        return CausalGraph(list(nodes.values())), report

    def _fit_mechanism(self, node: Node, nodes: dict, train: dict, heldout: dict):
        categorical = {p: nodes[p].num_classes for p in node.parents if nodes[p].type == "categorical"}
        kinds = ("affine", "logistic", "flow") if node.mechanism.kind == "auto" else (node.mechanism.kind,)
        if node.type == "categorical":
            kinds = ("gumbel_max",)
        low, high = node.range or (None, None)
        scored = []
        for kind in kinds:
            mechanism = Mechanism.fit(
                kind, train[node.name], {p: train[p] for p in node.parents}, low, high, categorical, node.num_classes
            )
            parents, observed = {p: heldout[p] for p in node.parents}, heldout[node.name]
            predicted = mechanism(parents, np.zeros(len(observed)))
            error = (
                {"heldout_accuracy": float(np.mean(predicted == observed))}
                if kind == "gumbel_max"
                else {"heldout_mae": float(np.mean(np.abs(predicted - observed)))}
            )
            record = {"kind": kind, "heldout_log_likelihood": mechanism.log_likelihood(parents, observed)} | error
            scored.append((record["heldout_log_likelihood"], mechanism, record))
        # A flow is taken only where it fits clearly better than the best closed form, which is kept where they tie.
        _, mechanism, record = max(scored, key=lambda item: item[0] - FLOW_MARGIN * (item[1].kind == "flow"))
        return replace(node, mechanism=mechanism), record

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

    def descendants(self, name: str) -> set[str]:
        found = {child for child, node in self.nodes.items() if name in node.parents}
        for child in list(found):
            found |= self.descendants(child)
        return found

    def check_value(self, name: str, value, observed: bool = False) -> np.ndarray:
        """`value` (a number or one per image) as an array, or a clear error for a wrong node, type or range. An
        `observed` (factual) value may lie up to OBSERVED_MARGIN of the range's width outside it, and is clipped into
        it: a range taken from the training split does not hold every held-out value."""
        if name not in self.nodes or self.nodes[name].type == "image":
            raise ValueError(f"Unknown variable {name!r}; this causal graph's variables are {self.variables}.")
        node = self.nodes[name]
        if node.type == "categorical" and _holds_strings(value):
            many = isinstance(value, list | tuple | np.ndarray)
            value = [node.class_index(v) for v in value] if many else node.class_index(value)
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
                names = f" or its class names {list(node.classes)}" if node.classes else ""
                raise ValueError(
                    f"{name!r} is categorical: class indices in [0, {node.num_classes - 1}]{names}, got {value!r}."
                )
            return array.astype(np.int64)
        low, high = node.range
        margin = OBSERVED_MARGIN * (high - low) if observed else 0.0
        if np.any(array < low - margin) or np.any(array > high + margin):
            within = f" (a factual one up to {margin:.4g} outside it)" if observed else ""
            raise ValueError(f"{name!r} must lie in its range [{low}, {high}]{within}, got {value!r}.")
        return np.clip(array.astype(np.float64), low, high)

    def counterfactual(self, factual: dict, intervention: dict) -> dict[str, np.ndarray]:
        """
        Abduction, action, prediction for the non-image nodes: do(intervention), then every descendant recomputed by
        its mechanism from its abducted noise (do(thickness) changes intensity); the rest keep their factual values.
        Values are numbers or one per image; factual values are needed only where they are used.
        """
        factual = {name: self.check_value(name, value, observed=True) for name, value in factual.items()}
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
                noise = node.mechanism.abduct(
                    factual, factual[name], seed=zlib.crc32(name.encode())
                )  # each node its own draw
                value = node.mechanism(values, noise)
                if node.type == "continuous":  # an affine mechanism may leave the range the data (and model) span
                    value = np.clip(value, *node.range)
            elif name in factual:
                value = factual[name]
            else:
                continue
            values[name] = np.round(value).astype(np.int64) if node.type == "categorical" else value
        size = max(np.size(v) for v in values.values())
        return {name: np.broadcast_to(v, (size,)).copy() for name, v in values.items()}

    def _validate(self, fitted: bool = True):
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
                raise ValueError(f'Categorical node {node.name!r} needs "num_classes" >= 2 or "classes".')
            if node.type != "categorical" and node.classes is not None:
                raise ValueError(f'Node {node.name!r} is {node.type}: only categorical nodes have "classes".')
            if node.type == "continuous" and node.range is None and fitted:
                raise ValueError(f"Continuous node {node.name!r} needs a range (low, high) with low < high.")
            if node.type == "continuous" and node.range is not None and not node.range[0] < node.range[1]:
                raise ValueError(f"Continuous node {node.name!r} needs a range (low, high) with low < high.")
            self._validate_mechanism(node, fitted)
        if not self.image.parents:
            raise ValueError("The image node needs at least one parent to intervene on.")

    def _validate_mechanism(self, node: Node, fitted: bool):
        mechanism = node.mechanism
        if node.type == "image" or not node.parents:
            if mechanism.kind != "identity" and node.type == "image":
                raise ValueError("The image's mechanism is the diffusion model; give it no mechanism.")
            if mechanism.weights:
                raise ValueError(f"Root node {node.name!r} has mechanism weights for parents it does not have.")
            return
        kinds = ("gumbel_max",) if node.type == "categorical" else ("affine", "logistic", "flow")
        choice = "a gumbel_max" if node.type == "categorical" else "an affine, logistic or flow"
        if mechanism.kind not in (*kinds, "identity", "auto"):
            raise ValueError(f"Node {node.name!r} is {node.type}: give it {choice} mechanism, not {mechanism.kind!r}.")
        if not fitted and (mechanism.kind == "identity" or not mechanism.fitted):
            if mechanism.kind == "identity":
                object.__setattr__(node, "mechanism", Mechanism("auto"))  # fitted from the data
            return
        if mechanism.kind in ("identity", "auto") or not mechanism.fitted:
            raise ValueError(
                f"Node {node.name!r} has parents {list(node.parents)}: give it {choice} mechanism (or fit one with "
                "Mechanism.fit, or leave it to the training scripts in a graph file)."
            )
        if mechanism.kind == "flow":
            if set(mechanism.flow.get("context", {})) != set(node.parents):
                raise ValueError(f"The flow of {node.name!r} is conditioned on other parents than {node.parents}.")
            return
        if mechanism.kind == "gumbel_max":
            self._validate_gumbel_max(node)
            return
        if set(mechanism.weights) != set(node.parents):
            raise ValueError(
                f"The mechanism of {node.name!r} weighs {sorted(mechanism.weights)}, but its parents are "
                f"{sorted(node.parents)}."
            )
        for parent, weight in mechanism.weights.items():
            classes = self.nodes[parent].num_classes if self.nodes[parent].type == "categorical" else None
            if classes is not None and (not isinstance(weight, tuple) or len(weight) != classes):
                raise ValueError(
                    f"The mechanism of {node.name!r}: categorical parent {parent!r} enters one-hot, so its weight is "
                    f"a list of {classes} numbers, got {weight!r}."
                )
            if classes is None and not isinstance(weight, int | float):
                raise ValueError(
                    f"The mechanism of {node.name!r}: the weight of {parent!r} is a number, got {weight!r}."
                )

    def _validate_gumbel_max(self, node: Node):
        mechanism, classes = node.mechanism, node.num_classes
        if set(mechanism.weights) != set(node.parents):
            raise ValueError(
                f"The mechanism of {node.name!r} weighs {sorted(mechanism.weights)}, but its parents are "
                f"{sorted(node.parents)}."
            )
        if np.shape(mechanism.bias) != (classes,):
            raise ValueError(f"The mechanism of {node.name!r}: its bias is {classes} logits, one per class.")
        for parent, weight in mechanism.weights.items():
            rows = self.nodes[parent].num_classes if self.nodes[parent].type == "categorical" else None
            shape = (rows, classes) if rows else (classes,)
            if np.shape(weight) != shape:
                raise ValueError(
                    f"The mechanism of {node.name!r}: the weight of {parent!r} is "
                    f"{f'{rows} rows (its classes) of ' if rows else ''}{classes} logits (one per class of "
                    f"{node.name!r}), got shape {np.shape(weight)}."
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


def _tuples(value):
    """Lists (and arrays) of numbers, nested or not, as tuples of floats; a number as it is."""
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(_tuples(v) for v in value)
    return float(value) if isinstance(value, int | float | np.number) and not isinstance(value, bool) else value


def _check_field(node: str, name: str, value, kind, description: str):
    if not isinstance(value, kind):
        raise ValueError(f"Node {node!r}: {name!r} must be {description}, got {value!r}.")


def _finite_pair(node: str, value) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f'Node {node!r}: "range" is [low, high], two numbers, got {value!r}.')
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f'Node {node!r}: "range" must be finite, got {list(value)}.')
    return float(value[0]), float(value[1])


def _class_names(node: str, classes, num_classes) -> tuple[str, ...]:
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f'Node {node!r}: "classes" is a list of class names (strings), got {classes!r}.')
    if len(set(classes)) != len(classes):
        raise ValueError(f'Node {node!r}: "classes" lists a name twice: {list(classes)}.')
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f'Node {node!r}: "num_classes" {num_classes} differs from its {len(classes)} "classes".')
    return tuple(classes)


def _holds_strings(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "US"
    return isinstance(value, str) or (isinstance(value, list | tuple) and any(isinstance(v, str) for v in value))
