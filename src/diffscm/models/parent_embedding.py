"""The parents of the image as the conditioning vector of a `UNet2DModel(class_embed_type="identity")`.

With it the noise model is the image's structural mechanism x = f(pa, u): eps_theta(x_t, t, pa). Every parent has a
learned null value, so that a parent dropped during training can be dropped at inference: classifier-free guidance,
per parent.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ParentEmbedding(ModelMixin, ConfigMixin):
    r"""
    Embeds the values of the image's parents into one vector per sample, added to the UNet's timestep embedding.

    A categorical parent has an `nn.Embedding` with one extra row, its null value; a continuous one is scaled to
    [0, 1] over its range, expanded into sinusoidal features and passed through a small MLP, with a learned null
    vector. The embeddings of all parents are summed. Every output layer starts at zero, so a UNet trained without
    conditioning starts as the same model and fine-tunes into a conditional one.

    Parameters:
        parents (`dict`): per parent name, `{"type": "categorical", "num_classes": K}` or
            `{"type": "continuous", "range": [low, high]}` (as for [`AntiCausalPredictor`]).
        embedding_dim (`int`): width of the UNet's timestep embedding (4 x its first block's channels).
        hidden_dim (`int`): hidden width of each continuous parent's MLP.
        num_frequencies (`int`): sinusoidal frequencies of a continuous value (2^0 .. 2^(n-1) periods over the range).
        zero_init (`bool`): start every embedding at zero, so that a pretrained unconditional UNet is unchanged at
            first (fine-tuning); False draws them like diffusers' class embeddings (N(0, 1)), so that a UNet trained
            from scratch sees its parents from the first step.
    """

    @register_to_config
    def __init__(
        self,
        parents: dict | None = None,
        embedding_dim: int = 128,
        hidden_dim: int = 128,
        num_frequencies: int = 6,
        zero_init: bool = True,
    ):
        super().__init__()
        check_parent_specs(parents)
        self.embeddings = nn.ModuleDict()
        self.null = nn.ParameterDict()
        for name, spec in parents.items():
            if spec["type"] == "categorical":
                self.embeddings[name] = nn.Embedding(spec["num_classes"] + 1, embedding_dim)
                if zero_init:
                    nn.init.zeros_(self.embeddings[name].weight)
            else:
                output = nn.Linear(hidden_dim, embedding_dim)
                if zero_init:
                    nn.init.zeros_(output.weight)
                    nn.init.zeros_(output.bias)
                self.embeddings[name] = nn.Sequential(
                    nn.Linear(2 * num_frequencies + 1, hidden_dim), nn.SiLU(), output
                )
                null = torch.zeros(embedding_dim) if zero_init else torch.randn(embedding_dim)
                self.null[name] = nn.Parameter(null)

    @property
    def parents(self) -> dict[str, dict]:
        return self.config.parents

    def forward(self, values: dict, dropped: dict | None = None) -> torch.Tensor:
        """
        The conditioning vector `(B, embedding_dim)`.

        Args:
            values: every parent's value, one per sample (a tensor or number), in the variable's own units.
            dropped: per parent, a bool tensor `(B,)` (or a bool) that replaces the value by the parent's null value;
                a parent missing from `values` altogether is dropped.
        """
        dropped = dropped or {}
        size = max((torch.as_tensor(v).numel() for v in values.values()), default=1)
        total = 0
        for name, spec in self.config.parents.items():
            if name not in values:
                total = total + self._null(name, size)
                continue
            value = torch.as_tensor(values[name], device=self.device).reshape(-1).expand(size)
            drop = torch.as_tensor(dropped.get(name, False), device=self.device).reshape(-1).expand(size)
            if spec["type"] == "categorical":
                index = torch.where(drop, spec["num_classes"], value.long())
                total = total + self.embeddings[name](index)
            else:
                features = sinusoidal_features(value, spec["range"], self.config.num_frequencies)
                embedded = self.embeddings[name](features.to(self.dtype))
                total = total + torch.where(drop[:, None], self.null[name], embedded)
        return total

    def _null(self, name: str, size: int) -> torch.Tensor:
        if self.config.parents[name]["type"] == "categorical":
            index = torch.full((size,), self.config.parents[name]["num_classes"], device=self.device)
            return self.embeddings[name](index)
        return self.null[name].expand(size, -1)


def sinusoidal_features(value: torch.Tensor, value_range, num_frequencies: int) -> torch.Tensor:
    """`(B,)` continuous values -> `(B, 2 n + 1)`: each scaled to [0, 1] over `value_range`, and its sines and cosines
    at 2^k periods over the range."""
    low, high = value_range
    scaled = ((value.float() - low) / (high - low))[:, None]
    angles = scaled * torch.pi * 2.0 ** torch.arange(num_frequencies, device=scaled.device)
    return torch.cat([scaled, torch.sin(angles), torch.cos(angles)], dim=1)


def check_parent_specs(parents: dict | None):
    if not parents:
        raise ValueError("`parents` must name at least one parent of the image.")
    for name, spec in parents.items():
        if spec.get("type") == "categorical" and spec.get("num_classes", 0) >= 2:
            continue
        low, high = spec.get("range") or (0, 0)
        if spec.get("type") != "continuous" or not low < high:
            raise ValueError(
                f"Parent {name!r}: expected {{'type': 'categorical', 'num_classes': K >= 2}} or "
                f"{{'type': 'continuous', 'range': [low, high]}} with low < high, got {spec}."
            )
