"""A pretrained ViT adapted to the task: another resolution, another number of classes.

  * A new resolution keeps every weight but the position embedding, which is resampled to the new
    grid as timm resamples it (`resample_abs_pos_embed`): the class token's position kept apart, the
    grid interpolated with torch's F.interpolate (align_corners=False), bicubic with antialias for
    timm's files and bilinear without for Google's (`pretrained.TIMM_RESAMPLE`, `GOOGLE_RESAMPLE`). The
    patch size stays: more pixels make more patches, not bigger ones.
  * Another number of classes replaces the head with zeros, as google-research/vision_transformer's
    fine-tuning does (a zero head starts every class at the same logit, and its first gradients come
    from the pretrained features alone). So does a checkpoint without a head, or with a pre-logits
    layer, which is dropped (the head read it; our model has none).
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from parity.pretrained import Pretrained
from vit_jax.config import ModelConfig


def resample_pos_embed(pos_embed: np.ndarray, new_grid: int, prefix: int, interpolation: str,
                       antialias: bool) -> np.ndarray:
    """(1, prefix + g * g, D) -> (1, prefix + new_grid ** 2, D), the prefix (class token) rows kept as they are."""
    pos = torch.from_numpy(np.asarray(pos_embed, np.float32))
    front, grid = pos[:, :prefix], pos[:, prefix:]
    g, dim = int(round(grid.shape[1] ** 0.5)), grid.shape[-1]
    grid = grid.reshape(1, g, g, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode=interpolation, antialias=antialias,
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)  # (1, new_grid ** 2, D), row-major
    return torch.cat([front, grid], dim=1).numpy()


def adapt(source: Pretrained, img_size: int | None = None, num_classes: int | None = None
          ) -> tuple[dict, ModelConfig, list[str]]:
    """(params, their config, what changed, in words) for images of img_size and num_classes classes
    (None: the checkpoint's own)."""
    cfg = source.config
    new = dataclasses.replace(cfg, img_size=img_size or cfg.img_size,
                              num_classes=num_classes or cfg.num_classes).validate()
    params, notes = dict(source.params), []
    if new.img_size != cfg.img_size:
        old_grid, new_grid = cfg.img_size // cfg.patch_size, new.img_size // new.patch_size
        params["pos_embed"] = resample_pos_embed(params["pos_embed"], new_grid, int(cfg.class_token), *source.resample)
        notes.append(f"position embedding resampled from {old_grid}x{old_grid} to {new_grid}x{new_grid} "
                     f"({source.resample[0]}{', antialiased' if source.resample[1] else ''}, as timm does)")
    if source.dropped:
        notes.append(f"pre-logits layer dropped ({', '.join(source.dropped)})")
    if not source.head or new.num_classes != cfg.num_classes:
        params["head"] = {"kernel": np.zeros((new.embed_dim, new.num_classes), np.float32),
                          "bias": np.zeros(new.num_classes, np.float32)}
        was = f"the checkpoint's had {cfg.num_classes}" if source.head else "the checkpoint had none to keep"
        notes.append(f"a new zero head of {new.num_classes} classes ({was})")
    return params, new, notes
