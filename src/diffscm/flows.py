"""A learned invertible mechanism v = f(pa, u) for a scalar node: a conditional neural spline flow (zuko's NSF).

Where an affine or logistic mechanism does not fit a node's data (a skewed, bimodal or clipped distribution given its
parents), `fit` trains a monotone rational-quadratic spline flow of the standardised value, conditioned on the parents
(categorical ones one-hot, continuous ones standardised), by maximum likelihood. Its transform is exactly invertible,
so the noise u (standard normal) is abducted by the forward map and a counterfactual value is the inverse under the
new parents. The whole flow is a plain dict of numbers (`spec`), saved with the causal graph in `model_index.json`.
"""

from functools import cache

import numpy as np

HIDDEN = (32, 32)
TRANSFORMS = 2
BINS = 8


def fit(value: np.ndarray, parents: dict[str, np.ndarray], num_classes: dict[str, int], steps: int = 600) -> dict:
    """The flow's spec fitted to observed values by full-batch Adam on their log-likelihood (seeded, so a fit is
    reproducible)."""
    import torch

    value = np.asarray(value, np.float64)
    context = {
        name: {"num_classes": num_classes[name]}
        if name in num_classes
        else {"mean": float(np.mean(parents[name])), "std": float(np.std(parents[name])) or 1.0}
        for name in sorted(parents)
    }
    spec = {"context": context, "mean": float(value.mean()), "std": float(value.std()) or 1.0}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flow = _build(spec)
        optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
        x, c = _standardised(spec, value), _context(spec, parents)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -flow(c).log_prob(x).mean()
            loss.backward()
            optimizer.step()
    return spec | {"state": {name: tensor.tolist() for name, tensor in flow.state_dict().items()}}


def forward(spec: dict, parents: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
    """v = f(pa, u): the inverse transform of the noise under the parents, in the value's units."""
    import torch

    noise = np.asarray(noise, np.float64)
    flow, size = _loaded(_key(spec)), np.broadcast(noise, *parents.values()).size
    with torch.no_grad():
        z = torch.tensor(np.broadcast_to(noise, (size,)), dtype=torch.float32)[:, None]
        x = flow(_context(spec, parents, size)).transform.inv(z)[:, 0].double().numpy()
    return x * spec["std"] + spec["mean"]


def abduct(spec: dict, parents: dict[str, np.ndarray], value: np.ndarray) -> np.ndarray:
    """u with f(pa, u) = value: the flow's forward transform."""
    import torch

    value = np.asarray(value, np.float64)
    flow, size = _loaded(_key(spec)), np.broadcast(value, *parents.values()).size
    with torch.no_grad():
        x = _standardised(spec, np.broadcast_to(value, (size,)))
        return flow(_context(spec, parents, size)).transform(x)[:, 0].double().numpy()


def log_likelihood(spec: dict, parents: dict[str, np.ndarray], value: np.ndarray) -> float:
    """Mean log density of observed values in their own units."""
    import torch

    with torch.no_grad():
        x = _standardised(spec, value)
        density = _loaded(_key(spec))(_context(spec, parents, len(x))).log_prob(x)
    return float(density.double().mean()) - float(np.log(spec["std"]))


def _build(spec: dict):
    import zuko

    width = sum(c.get("num_classes", 1) for c in spec["context"].values())
    return zuko.flows.NSF(features=1, context=width, bins=BINS, transforms=TRANSFORMS, hidden_features=HIDDEN)


def _key(spec: dict) -> str:
    import json

    return json.dumps(spec, sort_keys=True)


@cache
def _loaded(key: str):
    """The flow of a spec, built once (a graph's counterfactuals call it for every batch)."""
    import json

    import torch

    spec = json.loads(key)
    flow = _build(spec)
    flow.load_state_dict({name: torch.tensor(value) for name, value in spec["state"].items()})
    return flow.eval()


def _standardised(spec: dict, value) -> "torch.Tensor":  # noqa: F821
    import torch

    return torch.as_tensor((np.asarray(value, np.float64) - spec["mean"]) / spec["std"], dtype=torch.float32)[:, None]


def _context(spec: dict, parents: dict[str, np.ndarray], size: int | None = None) -> "torch.Tensor":  # noqa: F821
    import torch

    size = size or len(next(iter(parents.values())))
    columns = []
    for name, encoding in spec["context"].items():
        values = np.broadcast_to(np.asarray(parents[name]), (size,))
        if "num_classes" in encoding:
            columns.append(np.eye(encoding["num_classes"])[values.astype(np.int64)])
        else:
            columns.append(((values - encoding["mean"]) / encoding["std"])[:, None])
    return torch.as_tensor(np.concatenate(columns, axis=1), dtype=torch.float32)
