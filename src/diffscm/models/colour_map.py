"""The colour part of the image's mechanism: a per-pixel colour matrix set by some of the image's parents.

Some parents act on an image only through its colours (a hue, a stain, a tint, a scanner's brightness). With a
`ParentColourMap` the image's mechanism is x = A(c) y per pixel, a colour matrix over the channels of the image in
[0, 1] (black stays black, as under white balance or a camera's colour correction), where c are those parents and
y = f(pa with c at their reference values, u) the image as the conditional UNet draws it at the reference colour.
The map is invertible, so abduction reads y from x, and prediction writes x* from y* under the counterfactual
values: an intervention on c alone changes every pixel's colour and nothing else. The diffusion model's own flows
for two colours need not pair an image with its recolouring (observational data do not identify that coupling);
this structural assumption does.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .parent_embedding import check_parent_specs, sinusoidal_features


class ParentColourMap(ModelMixin, ConfigMixin):
    r"""
    x = A(c) y per pixel on images in [0, 1] (on the pipeline's [-1, 1] images, x + 1 = A(c) (y + 1)): a `(C, C)`
    matrix from the values c of the colour parents, by a small MLP (a categorical parent one-hot, a continuous one
    scaled to [0, 1] over its range with sinusoidal features), less its output at the reference values: the map is
    the identity there, so y is the image itself for an image at the reference colour. Its output layer starts at
    zero, so the map starts as the identity.

    Parameters:
        parents (`dict`): the parents that set the colour, as for [`ParentEmbedding`].
        reference (`dict`): each colour parent's reference value, at which the UNet draws the image (a class index
            for a categorical parent).
        num_channels (`int`): the image's channels.
        hidden_dim (`int`), num_frequencies (`int`): the MLP's width and a continuous value's sinusoidal frequencies.
    """

    @register_to_config
    def __init__(
        self,
        parents: dict | None = None,
        reference: dict | None = None,
        num_channels: int = 3,
        hidden_dim: int = 64,
        num_frequencies: int = 4,
    ):
        super().__init__()
        check_parent_specs(parents)
        check_reference(parents, reference)
        features = sum(
            spec["num_classes"] if spec["type"] == "categorical" else 2 * num_frequencies + 1
            for spec in parents.values()
        )
        self.net = nn.Sequential(nn.Linear(features, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_channels**2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @property
    def parents(self) -> dict[str, dict]:
        return self.config.parents

    def colour_matrix(self, values: dict) -> torch.Tensor:
        """A `(B, C, C)` for the colour parents' `values` (one per sample, in their own units); the identity at the
        reference values."""
        channels = self.config.num_channels
        output = self._output(values) - self._output(self.config.reference)
        return torch.eye(channels, device=output.device) + output.view(-1, channels, channels)

    def _output(self, values: dict) -> torch.Tensor:
        size = max(torch.as_tensor(values[name]).numel() for name in self.parents)
        features = []
        for name, spec in self.parents.items():
            value = torch.as_tensor(values[name], device=self.device).reshape(-1).expand(size)
            if spec["type"] == "categorical":
                features.append(nn.functional.one_hot(value.long(), spec["num_classes"]).float())
            else:
                features.append(sinusoidal_features(value, spec["range"], self.config.num_frequencies))
        return self.net(torch.cat(features, dim=1).to(self.dtype)).float()

    def forward(self, sample: torch.Tensor, values: dict) -> torch.Tensor:
        """The image `(B, C, H, W)` in [-1, 1] at the reference colour -> the image under `values`."""
        matrix = self.colour_matrix(values).to(sample.dtype)
        return torch.einsum("bij,bjhw->bihw", matrix, sample + 1) - 1

    def to_reference(self, sample: torch.Tensor, values: dict) -> torch.Tensor:
        """The image in [-1, 1] under `values` -> the image at the reference colour."""
        matrix = self.colour_matrix(values).to(sample.dtype)
        return torch.linalg.solve(matrix, (sample + 1).flatten(2)).view(sample.shape) - 1


def check_reference(parents: dict, reference: dict | None):
    """A reference value for every colour parent, inside its range or a class index."""
    if not isinstance(reference, dict) or set(reference) != set(parents):
        raise ValueError(f"`reference` must give a value for each colour parent {sorted(parents)}, got {reference!r}.")
    for name, value in reference.items():
        spec = parents[name]
        if spec["type"] == "categorical":
            valid = isinstance(value, int) and 0 <= value < spec["num_classes"]
        else:
            valid = isinstance(value, int | float) and spec["range"][0] <= value <= spec["range"][1]
        if not valid:
            raise ValueError(f"The reference value of {name!r}, {value!r}, is outside its {spec}.")
