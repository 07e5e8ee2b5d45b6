"""DeepFloyd IF stage II's UNet conditioning on torch tensors, as ``IFSuperResolutionPipeline`` builds it.

The stage II UNet sees ``cat([x_t, cond], dim=1)`` with ``class_labels=level``, where ``cond`` is the
low-resolution image upscaled bilinearly (``align_corners=True``) and noised to ``level`` by the
pipeline's ``image_noising_scheduler``. Training feeds the same input: the low-resolution image is
the training crop box-downsampled to stage I's 64 px and rounded to the 8-bit grid a PIL stage-I image
lies on, and ``level`` is drawn uniformly per row (Imagen's noise-conditioning augmentation; the
pipeline's default 250 lies inside it). The arithmetic pieces are the shared ``jaxbooth.deepfloyd``;
this module only composes them with torch's interpolation. Imports torch and the shared core; never jax.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jaxbooth import deepfloyd, diffusion


@dataclasses.dataclass(frozen=True, eq=False)
class UpscalerConditioning:
    """Stage II's conditioning input: ``tables`` of the image-noising schedule (tensors on the training device),
    ``num_noise_levels`` its timesteps (levels are drawn in [0, num_noise_levels)), ``factor`` the upscale."""

    tables: diffusion.NoiseTables
    num_noise_levels: int
    factor: int

    @classmethod
    def from_model_dir(cls, model_dir: Path, resolution: int, device: torch.device) -> UpscalerConditioning:
        """From the stage II folder's ``image_noising_scheduler`` and the training ``--resolution``."""
        schedule = deepfloyd.load_noising_schedule(model_dir)
        tables = schedule.as_tables().map(lambda table: torch.from_numpy(np.asarray(table)).to(device))
        return cls(tables=tables, num_noise_levels=schedule.num_train_timesteps,
                   factor=deepfloyd.low_res_factor(resolution))

    def low_res_inputs(self, x0: torch.Tensor) -> torch.Tensor:
        """[B, C, H/f, W/f]: the crop as stage I would have made it (box-downsampled, on the 8-bit grid)."""
        return deepfloyd.quantize_8bit(deepfloyd.downsample_box(x0.float(), self.factor, channel_axis=1))

    def condition(self, x0: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W]: the low-resolution version of ``x0`` upscaled back to its size and noised to ``levels``
        (int [B]) with ``noise`` ([B, C, H, W]), the UNet's extra input channels."""
        upscaled = F.interpolate(self.low_res_inputs(x0), size=tuple(x0.shape[-2:]), mode=deepfloyd.UPSAMPLE_MODE,
                                 align_corners=deepfloyd.UPSAMPLE_ALIGN_CORNERS)
        return diffusion.add_noise(upscaled, noise.float(), levels, self.tables)
