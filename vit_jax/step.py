"""The train state, the optimizer and its schedule, the one inference function, and the jitted steps.

Pure JAX: no data I/O, no TensorFlow, so the benchmark can run it on a bare accelerator. Steps are
compiled for a `devices.DataParallel` mesh: the batch is sharded, parameters are replicated.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from vit_jax import augment
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.devices import DataParallel
from vit_jax.model import VisionTransformer, init_params


class TrainState(train_state.TrainState):
    """params, opt_state and step; `step` counts optimizer updates since the start of training."""


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the update count.

    epoch_cosine (the default) is PyTorch's CosineAnnealingLR(T_max=epochs) stepped once per epoch:
    constant within an epoch, lr at epoch 1, lr * (1 + cos(pi * e / epochs)) / 2 at epoch e + 1.
    cosine decays every step, after an optional linear warm-up.
    """
    if cfg.schedule == "epoch_cosine":
        per_epoch = optax.cosine_decay_schedule(cfg.lr, decay_steps=cfg.epochs)
        return lambda count: per_epoch(count // steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup_steps=warmup, decay_steps=cfg.epochs * steps_per_epoch, end_value=0.0)


def decay_mask(params):
    """True for weight matrices; False for biases, norms, class token and position embedding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and path[-1].key not in ("cls_token", "pos_embed"), params)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    # torch.optim.AdamW's defaults, pinned: betas (0.9, 0.999), eps 1e-8 outside the square root.
    return optax.adamw(make_schedule(cfg, steps_per_epoch), b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=cfg.weight_decay, mask=None if cfg.decay_all else decay_mask)


def create_train_state(model_cfg: ModelConfig, cfg: TrainConfig, steps_per_epoch: int,
                       params=None) -> TrainState:
    """A fresh state: random parameters from cfg.seed unless `params` are given."""
    if params is None:
        params = init_params(model_cfg, jax.random.key(cfg.seed))
    return TrainState.create(apply_fn=VisionTransformer(model_cfg).apply, params=params,
                             tx=make_optimizer(cfg, steps_per_epoch))


# --------------------------------------------------------------------------------------------------
# Inference


def infer(model_cfg: ModelConfig, params, images, attention: bool = False, stages: bool = False) -> dict:
    """The model at inference: uint8 images (B, 32, 32, 3) -> {'logits': (B, C) float32}.

    The one forward pass of evaluation, prediction, the attention maps and the comparison with the
    PyTorch twin. On request it also returns 'attention', the softmax weights of every block
    (L, B, H, T, T), and 'stages', the named intermediate outputs (embed, blockNN, norm or pool, logits).
    """
    x = augment.preprocess(images, model_cfg.img_size)
    model = VisionTransformer(model_cfg)
    if not attention:
        logits, named = model.apply({"params": params}, x, return_stages=True)
        return {"logits": logits, **({"stages": named} if stages else {})}
    (logits, named), sown = model.apply({"params": params}, x, return_stages=True, mutable=["intermediates"])
    # Each block sows one (B, H, T, T) array into a tuple.
    weights = [sown["intermediates"][f"blocks_{i}"]["attn"]["attn"][0] for i in range(model_cfg.depth)]
    return {"logits": logits, "attention": jnp.stack(weights), **({"stages": named} if stages else {})}


infer_jit = jax.jit(infer, static_argnames=("model_cfg", "attention", "stages"))


# --------------------------------------------------------------------------------------------------
# Running sums of the loss and accuracy


def zero_metrics() -> dict:
    """Running sums over examples (means are taken on the host, only when printed), and the first
    step whose loss was not finite (-1: none yet)."""
    return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
            "count": jnp.zeros((), jnp.float32), "nonfinite_step": jnp.full((), -1, jnp.int32)}


def means(metrics) -> tuple[float, float]:
    """(mean loss, accuracy %) of running sums; reads them back from the device."""
    m = jax.device_get(metrics)
    n = max(float(m["count"]), 1.0)
    return float(m["loss"]) / n, 100.0 * float(m["correct"]) / n


def _accumulate(metrics: dict, sums: dict) -> dict:
    return {**metrics, **{k: metrics[k] + v for k, v in sums.items()}}


def _sums(logits, labels, mask):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum((logits.argmax(-1) == labels) * mask),
            "count": jnp.sum(mask)}


# --------------------------------------------------------------------------------------------------
# The steps


@dataclasses.dataclass(frozen=True)
class Augment:
    """Static settings of the on-device augmentation."""
    img_size: int
    rotation: float = 0.0
    color_jitter: float = 0.0


def train_step(state: TrainState, metrics: dict, images, labels, mask, key, aug: Augment):
    """One AdamW update on a uint8 batch; padding examples (mask 0) carry no weight.

    Randomness is a pure function of (key, step), so a resumed run draws what an uninterrupted one would.
    """
    step_key = jax.random.fold_in(key, state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    x = augment.augment(aug_key, images, aug.img_size, aug.rotation, aug.color_jitter)

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        sums = _sums(logits, labels, mask)
        return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics = _accumulate(metrics, sums)
    first_bad = (metrics["nonfinite_step"] < 0) & ~jnp.isfinite(sums["loss"])
    metrics["nonfinite_step"] = jnp.where(first_bad, state.step.astype(jnp.int32), metrics["nonfinite_step"])
    return state.apply_gradients(grads=grads), metrics


def eval_step(params, metrics: dict, images, labels, mask, model_cfg: ModelConfig):
    """Adds one batch's loss and correct predictions to the running sums. Needs no optimizer."""
    return _accumulate(metrics, _sums(infer(model_cfg, params, images)["logits"], labels, mask))


def jit_train_step(parallel: DataParallel, aug: Augment):
    """train_step compiled for these devices; the state and running metrics are donated."""
    r = parallel.replicated
    return jax.jit(functools.partial(train_step, aug=aug), donate_argnums=(0, 1), out_shardings=(r, r))


def jit_eval_step(parallel: DataParallel, model_cfg: ModelConfig):
    """eval_step compiled for these devices; the running metrics are donated."""
    return jax.jit(functools.partial(eval_step, model_cfg=model_cfg), donate_argnums=(1,),
                   out_shardings=parallel.replicated)


def evaluate(eval_fn, parallel: DataParallel, params, batches) -> tuple[float, float]:
    """(loss, accuracy %) over `batches`, an iterable of (images, labels, mask): a whole split."""
    metrics = parallel.replicate(zero_metrics())
    for batch in batches:
        metrics = eval_fn(params, metrics, *parallel.put_batch(*batch))
    return means(metrics)
