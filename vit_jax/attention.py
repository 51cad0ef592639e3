"""Attention weights of the trained model, and the maps made from them: rollout and class-token attention.

The weights are the ones `model.Attention` sows while the model runs (`step.infer`), so what is
shown is what the trained model computed: there is no second implementation of the forward pass here.
"""

import jax
import numpy as np

from vit_jax import step
from vit_jax.config import ModelConfig


def attention_weights(model_cfg: ModelConfig, params, images) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, 32, 32, 3) -> (logits (B, C), softmax weights of every layer (L, B, H, T, T)).

    With a class token it is token 0 and tokens 1..N are the patches in row-major order; without
    one, tokens 0..N-1 are the patches.
    """
    out = step.infer_jit(model_cfg, params, np.asarray(images), attention=True)
    return np.asarray(out["logits"]), np.asarray(out["attention"])


def grid_side(num_patches: int) -> int:
    """Side of the square grid of N patch tokens."""
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side


def _readout(weights: np.ndarray, class_token: bool) -> np.ndarray:
    """(..., T, T) -> (..., N): what the head reads, spread over the patch tokens. With a class token,
    its row (its weight on itself left out); without one (global_pool avg, the mean of all tokens),
    the mean of every token's row."""
    return weights[..., 0, 1:] if class_token else weights.mean(axis=-2)


def rollout(attn: np.ndarray, class_token: bool = True) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): (L, B, H, T, T) weights -> (B, g, g) maps.

    Per layer the heads are averaged. The residual connection around each attention layer carries a
    token's own representation forward untouched, so the layer's effective mixing is taken as half
    attention, half identity: A + I with its rows renormalized to sum to one, i.e. (A + I) / 2. The
    MLPs and LayerNorms, which act on each token alone, are left out. The layers are then composed,
    A_L ... A_2 A_1, and the row of what the head reads (the class token, or the mean of all tokens)
    says how much each input patch reaches it through all layers. Each map is non-negative and sums to one.
    """
    mixing = attn.astype(np.float64).mean(axis=2)  # (L, B, T, T)
    mixing = mixing + np.eye(mixing.shape[-1])
    mixing /= mixing.sum(axis=-1, keepdims=True)
    joint = mixing[0]
    for layer in mixing[1:]:
        joint = layer @ joint  # (B, T, T): later layers act on what earlier ones produced
    maps = _readout(joint, class_token)  # (B, N)
    maps /= maps.sum(axis=-1, keepdims=True)
    g = grid_side(maps.shape[-1])
    return maps.reshape(-1, g, g)  # (B, g, g), patches row-major as PatchEmbed cuts them


def head_attention(attn: np.ndarray, class_token: bool = True, layer: int = -1) -> np.ndarray:
    """What the head's input attends to in one layer, per head: (L, B, H, T, T) -> (B, H, g, g).

    The class token's softmax row over the patch tokens (its weight on itself left out, so each map
    sums to at most one), or without a class token the mean row of all tokens.
    """
    maps = _readout(attn[layer], class_token)  # (B, H, N)
    g = grid_side(maps.shape[-1])
    return maps.reshape(maps.shape[0], maps.shape[1], g, g)


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """(..., g, g) patch maps -> (..., size, size), bilinear, to lie over an image of that size."""
    maps = np.asarray(maps, np.float32)
    out = jax.image.resize(maps, maps.shape[:-2] + (size, size), method="bilinear")
    return np.maximum(np.asarray(out), 0.0)  # bilinear weights are non-negative; this only clips rounding
