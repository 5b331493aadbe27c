"""The project's score network: a compact, fully convolutional UNet with a noise-level embedding.

The architecture follows DDPM's UNet (Ho et al., NeurIPS 2020) without attention, so that a prior
trained on patches applies to images of any size divisible by ``2 ** (len(channel_multipliers) - 1)``:
residual blocks with GroupNorm and SiLU, the embedding added inside every block, stride-2
convolutions down, nearest-neighbour upsampling up, skip connections by concatenation.

``EpsilonNetwork`` wraps the UNet for an SDE: it scales the input to unit variance and feeds the
log signal-to-noise level as the embedding (EDM's preconditioning, Karras et al., NeurIPS 2022),
so one architecture trains on VP, VE and DDPM schedules alike. Its output is the predicted noise
``eps_hat(x_t, t)``; ``NetworkPrior(..., parametrisation="epsilon")`` turns it into a score.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from invdiff.sde import SDE

__all__ = ["UNet", "EpsilonNetwork"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class _ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float):
        super().__init__()
        self.norm_in = _group_norm(in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, out_channels)
        self.norm_out = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        hidden = self.conv_in(nn.functional.silu(self.norm_in(x)))
        hidden = hidden + self.embedding(embedding)[:, :, None, None]
        hidden = self.conv_out(self.dropout(nn.functional.silu(self.norm_out(hidden))))
        return self.skip(x) + hidden


class UNet(nn.Module):
    """``UNet(x, noise_feature) -> tensor of x's shape``; ``noise_feature`` has shape ``(B,)``.

    ``channels`` at the top level, multiplied by ``channel_multipliers`` per level (each level
    halves the resolution), ``blocks_per_level`` residual blocks per level on the way down and one
    more on the way up.
    """

    def __init__(self, image_channels: int = 1, channels: int = 32, channel_multipliers: tuple[int, ...] = (1, 2, 2),
                 blocks_per_level: int = 2, dropout: float = 0.0):
        super().__init__()
        self.arguments = {"image_channels": image_channels, "channels": channels,
                          "channel_multipliers": list(channel_multipliers), "blocks_per_level": blocks_per_level,
                          "dropout": dropout}
        embedding_dim = 4 * channels
        self.frequencies = nn.Parameter(torch.exp(-math.log(1000.0) * torch.arange(channels // 2) / (channels // 2)),
                                        requires_grad=False)
        self.embed = nn.Sequential(nn.Linear(channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [channels]
        current = channels
        for level, multiplier in enumerate(channel_multipliers):
            for _ in range(blocks_per_level):
                self.down.append(_ResidualBlock(current, channels * multiplier, embedding_dim, dropout))
                current = channels * multiplier
                skip_channels.append(current)
            if level < len(channel_multipliers) - 1:
                self.down.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skip_channels.append(current)
        self.middle = nn.ModuleList([_ResidualBlock(current, current, embedding_dim, dropout),
                                     _ResidualBlock(current, current, embedding_dim, dropout)])
        self.up = nn.ModuleList()
        for level, multiplier in reversed(list(enumerate(channel_multipliers))):
            for _ in range(blocks_per_level + 1):
                self.up.append(_ResidualBlock(current + skip_channels.pop(), channels * multiplier, embedding_dim,
                                              dropout))
                current = channels * multiplier
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(current, current, 3, padding=1)))
        self.norm_out = _group_norm(current)
        self.conv_out = nn.Conv2d(current, image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.arguments["channel_multipliers"]) - 1)

    def forward(self, x: Tensor, noise_feature: Tensor) -> Tensor:
        if x.shape[-1] % self.downsampling_factor or x.shape[-2] % self.downsampling_factor:
            raise ValueError(f"UNet needs height and width divisible by {self.downsampling_factor}, "
                             f"got {tuple(x.shape[-2:])}")
        angles = noise_feature.to(x.dtype)[:, None] * self.frequencies.to(x.dtype)[None]
        embedding = self.embed(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))
        hidden = self.conv_in(x)
        skips = [hidden]
        for module in self.down:
            hidden = module(hidden, embedding) if isinstance(module, _ResidualBlock) else module(hidden)
            skips.append(hidden)
        for module in self.middle:
            hidden = module(hidden, embedding)
        for module in self.up:
            if isinstance(module, _ResidualBlock):
                hidden = module(torch.cat([hidden, skips.pop()], dim=1), embedding)
            else:
                hidden = module(hidden)
        return self.conv_out(nn.functional.silu(self.norm_out(hidden)))


class EpsilonNetwork(nn.Module):
    """``eps_hat(x_t, t)`` for an SDE: the UNet on the unit-variance input and the log noise-to-signal ratio.

    ``data_std`` is the clean data's standard deviation (in the native space), used to scale the
    input: ``x_t / sqrt(lambda_t^2 data_std^2 + sigma_t^2)``.
    """

    def __init__(self, unet: UNet, sde: SDE, data_std: float = 0.5):
        super().__init__()
        self.unet = unet
        self.sde = sde
        self.data_std = float(data_std)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        times = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        lambda_t, sigma_t = self.sde.lambda_t(times), self.sde.sigma_t(times)
        scale = torch.rsqrt(lambda_t**2 * self.data_std**2 + sigma_t**2).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        noise_feature = torch.log(sigma_t / lambda_t).to(x.dtype) * 10.0
        return self.unet(x * scale, noise_feature)
