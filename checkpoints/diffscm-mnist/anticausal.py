"""The anti-causal predictor p_phi(parent | x_t, t): a noise-aware classifier built like a UNet's encoder half."""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class AntiCausalClassifierOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`): unnormalised log p_phi(class | x_t, t).
    """

    logits: torch.Tensor


class AntiCausalClassifier(ModelMixin, ConfigMixin):
    r"""
    Noise-aware classifier p_phi(y | x_t, t) of a parent y of the image, queried at the scheduler's raw timesteps.

    Residual down blocks (optionally with attention), a mid block at the lowest resolution and a pooled linear head;
    every residual block is conditioned on a sinusoidal timestep embedding, as in diffusers' `UNet2DModel`.

    Parameters:
        sample_size (`int`): height and width of the input images.
        in_channels (`int`): number of image channels.
        num_classes (`int`): number of values of the categorical parent.
        down_block_types (`tuple[str]`): diffusers down block names, e.g. `"DownBlock2D"`, `"AttnDownBlock2D"`.
        block_out_channels (`tuple[int]`): channels of each down block.
        layers_per_block (`int`): residual blocks per down block.
        mid_block_attention (`bool`): self-attention in the mid block at the lowest resolution.
        attention_head_dim (`int`): channels per attention head.
        norm_num_groups (`int`): groups of every GroupNorm.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        mid_block_attention: bool = True,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels):
            raise ValueError(
                f"`down_block_types` ({len(down_block_types)}) and `block_out_channels` ({len(block_out_channels)}) "
                "must have the same length."
            )
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}.")
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        self.down_blocks = nn.ModuleList()
        in_ch = block_out_channels[0]
        for i, (block_type, out_ch) in enumerate(zip(down_block_types, block_out_channels, strict=True)):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_embed_dim,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                )
            )
            in_ch = out_ch
        self.mid_block = UNetMidBlock2D(
            in_channels=in_ch,
            temb_channels=time_embed_dim,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            add_attention=mid_block_attention,
            attention_head_dim=attention_head_dim,
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, in_ch)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> AntiCausalClassifierOutput | tuple:
        """Logits of p_phi(y | x_t = `sample`, t = `timestep`); `timestep` is a number or one value per sample."""
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        temb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))

        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            hidden, _ = block(hidden, temb)
        hidden = self.mid_block(hidden, temb)
        hidden = nn.functional.silu(self.norm_out(hidden)).mean(dim=(2, 3))
        logits = self.head(hidden)
        if not return_dict:
            return (logits,)
        return AntiCausalClassifierOutput(logits=logits)
