"""The train state, the optimizer and its schedule, the one inference function, and the jitted steps.

Pure JAX: no data I/O, no TensorFlow, so the benchmark can run it on a bare accelerator. Steps are
compiled for a `devices.DataParallel` mesh: the batch is sharded, parameters are replicated.
"""

import collections
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from vit_jax import augment
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.devices import DataParallel
from vit_jax.model import VisionTransformer, init_params

# Steps dispatched ahead of the device, in training and evaluation. The host prepares the next batch
# while the device computes, a stop (Ctrl+C, SIGTERM, the budget's deadline) is acted on within this
# many steps, and the devices of a multi-device CPU mesh never hold more queued programs than this
# (with all of an evaluation's batches queued at once, their collectives could wait on each other
# past XLA's rendezvous timeout: docs/benchmarks.md).
IN_FLIGHT = 2


class TrainState(train_state.TrainState):
    """params, opt_state and step (optimizer updates since the start of training), and with
    --ema_decay the exponential moving average of the params, which evaluation then uses."""

    ema_params: Any = flax.struct.field(default=None)

    def apply_gradients(self, *, grads, lr):
        """One update: the optimizer's at a learning rate of 1, times the schedule's rate `lr`."""
        params, opt_state = adamw_update(self.tx, self.params, self.opt_state, grads, lr)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


@flax.struct.dataclass
class Schedule:
    """The learning rate as a function of the update count.

    epoch_cosine (the default) is PyTorch's CosineAnnealingLR(T_max=epochs) stepped once per epoch:
    constant within an epoch, lr at epoch 1, lr * (1 + cos(pi * e / epochs)) / 2 at epoch e + 1.
    cosine decays every step, after a linear warm-up of warmup_steps (0: none).
    The numbers are arguments of the compiled step, not constants in it: runs that differ only in
    them (their length, their peak, a --time_budget's revisions of its length) share one program.
    """

    lr: Any
    total_steps: Any  # the run's length in updates; the last epoch may be partial (--time_budget)
    steps_per_epoch: Any
    warmup_steps: Any
    per_epoch: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> "Schedule":
        """The run's schedule over `total_steps` updates (default: cfg.epochs whole epochs)."""
        total = cfg.epochs * steps_per_epoch if total_steps is None else total_steps
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        if total < cfg.epochs * steps_per_epoch:  # a --time_budget shortened the run: warm up for half at most
            warmup = min(warmup, total // 2)
        # numpy scalars, not Python numbers: every process must replicate the same typed values
        return cls(np.float32(cfg.lr), np.int32(total), np.int32(steps_per_epoch), np.int32(warmup),
                   per_epoch=cfg.schedule == "epoch_cosine")

    def __call__(self, count):
        # Op for op what optax's cosine_decay_schedule and warmup_cosine_decay_schedule compute.
        def cosine(done, total):  # from lr down to 0 over `total`, then 0
            return self.lr * (0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(done, total) / total)))

        if self.per_epoch:
            epochs = (self.total_steps + self.steps_per_epoch - 1) // self.steps_per_epoch
            return cosine(count // self.steps_per_epoch, epochs)
        warm = self.warmup_steps
        rising = -self.lr * (1 - count / jnp.maximum(warm, 1)) + self.lr  # linear from 0
        return jnp.where(count < warm, rising, cosine(count - warm, self.total_steps - warm))


def learning_rate(schedule: Schedule, count: int) -> float:
    """The schedule's rate at update `count`, computed as the compiled step computes it: for the logs
    and the metrics' record (one compiled program, not a compilation per operation)."""
    return float(_rate(schedule, count))


_rate = jax.jit(Schedule.__call__)


def decay_mask(params):
    """True for weight matrices; False for biases, norms, class token and position embedding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and path[-1].key not in ("cls_token", "pos_embed"), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (--optimizer sgd: SGD with momentum 0.9; lion: Lion) at a learning rate of 1 (the schedule scales
    its updates: `adamw_update`); with --grad_clip, the gradients' global norm is capped first (as
    torch.nn.utils.clip_grad_norm_ before the optimizer's step)."""
    return _optimizer(cfg.weight_decay, cfg.decay_all, cfg.grad_clip, cfg.optimizer)


@functools.cache  # one object per setting: states made apart share one compiled step
def _optimizer(weight_decay: float, decay_all: bool, grad_clip: float,
               optimizer: str = "adamw") -> optax.GradientTransformation:
    mask = None if decay_all else decay_mask
    if optimizer == "sgd":
        # torch.optim.SGD(momentum=0.9)'s: buf = 0.9 buf + (grad + weight_decay * params), params -= lr * buf.
        sgd = optax.sgd(1.0, momentum=0.9)
        tx = optax.chain(optax.add_decayed_weights(weight_decay, mask), sgd) if weight_decay else sgd
    elif optimizer == "lion":
        # The sign of 0.1 grad + 0.9 momentum, plus weight_decay * params; the momentum averages at 0.99.
        tx = optax.lion(lambda count: 1.0, b1=0.9, b2=0.99, weight_decay=weight_decay, mask=mask)
    else:
        # torch.optim.AdamW's defaults, pinned: betas (0.9, 0.999), eps 1e-8 outside the square root. The
        # rate of 1 is a function, so that optax keeps the update count in its state, as with a schedule.
        tx = optax.adamw(lambda count: 1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx


def adamw_update(tx: optax.GradientTransformation, params, opt_state, grads, lr):
    """(params, opt_state) after one step of `tx`, its update scaled by the learning rate `lr`: AdamW's
    -lr * (Adam's direction + weight_decay * params), as optax computes it with the rate inside (SGD's:
    -lr * its momentum buffer, as torch.optim.SGD's step with the scheduler's rate)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates)), opt_state


def create_train_state(model_cfg: ModelConfig, cfg: TrainConfig, params=None) -> TrainState:
    """A fresh state: random parameters from cfg.seed unless `params` are given."""
    if params is None:
        params = init_params(model_cfg, jax.random.key(cfg.seed))
    return _new_state(model_cfg, (cfg.weight_decay, cfg.decay_all, cfg.grad_clip, cfg.optimizer), bool(cfg.ema_decay),
                      params)


# Jitted: the optimizer's zeros and the average's copy in one compiled program, instead of one small
# compilation per parameter shape (seconds at the start of a GPU run; a compilation-cache look-up each
# on the CPU).
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _new_state(model_cfg: ModelConfig, optimizer: tuple, ema: bool, params) -> TrainState:
    return TrainState.create(apply_fn=_apply_fn(model_cfg), params=params, tx=_optimizer(*optimizer),
                             ema_params=jax.tree.map(jnp.copy, params) if ema else None)


@functools.cache  # as the optimizer: the same function for every state of a model, so they compile as one
def _apply_fn(model_cfg: ModelConfig):
    return VisionTransformer(model_cfg).apply


def ema_decay(decay: float, step):
    """The average's decay at update `step` (counted from 1): `decay`, but lower while few updates are
    in it, (1 + step) / (10 + step), so the first ones are not averaged with the random init."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def eval_params(state: TrainState):
    """The parameters that evaluation, the best checkpoint and the export use: the average, if kept."""
    return state.params if state.ema_params is None else state.ema_params


# --------------------------------------------------------------------------------------------------
# Inference


def infer(model_cfg: ModelConfig, params, images, attention: bool = False, stages: bool = False,
          tta_flip: bool = False) -> dict:
    """The model at inference: uint8 images (B, 32, 32, 3) -> {'logits': (B, C) float32}.

    The one forward pass of evaluation, prediction, the attention maps and the comparison with the
    PyTorch twin. On request it also returns 'attention', the softmax weights of every block
    (L, B, H, T, T), and 'stages', the named intermediate outputs (embed, blockNN, norm or pool, logits).
    tta_flip: the logits are the mean of the image's and its mirror image's (test-time augmentation).
    """
    x = augment.preprocess(images, model_cfg.img_size)
    model = VisionTransformer(model_cfg)
    if tta_flip:
        both = model.apply({"params": params}, jnp.concatenate([x, augment.flip(x)]))  # (2B, C)
        return {"logits": (both[:len(x)] + both[len(x):]) / 2}
    if not attention:
        logits, named = model.apply({"params": params}, x, return_stages=True)
        return {"logits": logits, **({"stages": named} if stages else {})}
    (logits, named), sown = model.apply({"params": params}, x, return_stages=True, mutable=["intermediates"])
    # Each block sows one (B, H, T, T) array into a tuple.
    weights = [sown["intermediates"][f"blocks_{i}"]["attn"]["attn"][0] for i in range(model_cfg.depth)]
    return {"logits": logits, "attention": jnp.stack(weights), **({"stages": named} if stages else {})}


infer_jit = jax.jit(infer, static_argnames=("model_cfg", "attention", "stages", "tta_flip"))


# --------------------------------------------------------------------------------------------------
# Running sums of the loss and accuracy


def zero_metrics() -> dict:
    """Running sums over examples (means are taken on the host, only when printed), and the first
    step whose loss was not finite (-1: none yet). Host arrays: `DataParallel.replicate` places them."""
    return {"loss": np.zeros((), np.float32), "correct": np.zeros((), np.float32),
            "count": np.zeros((), np.float32), "nonfinite_step": np.full((), -1, np.int32)}


def means(metrics) -> tuple[float, float]:
    """(mean loss, accuracy %) of running sums; reads them back from the device."""
    m = jax.device_get(metrics)
    n = max(float(m["count"]), 1.0)
    return float(m["loss"]) / n, 100.0 * float(m["correct"]) / n


def _accumulate(metrics: dict, sums: dict) -> dict:
    return {**metrics, **{k: metrics[k] + v for k, v in sums.items()}}


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-example cross-entropy against one-hot labels, or with label_smoothing s against
    (1 - s) one-hot + s / C (PyTorch's F.cross_entropy(label_smoothing=s))."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _sums(logits, labels, mask, label_smoothing: float = 0.0):
    loss = cross_entropy(logits, labels, label_smoothing)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum((logits.argmax(-1) == labels) * mask),
            "count": jnp.sum(mask)}


# --------------------------------------------------------------------------------------------------
# The steps


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the jitted steps take as static: augmentation, the loss's smoothing, the average's decay,
    test-time flipping, the micro-batches, the tokens dropped (None: the model's patch_drop_rate).
    `Settings.of(model_cfg, cfg, early)` reads them off a run's configs, in the token schedule's early
    part if `early`."""

    img_size: int
    rotation: float = 0.0
    color_jitter: float = 0.0
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    tta_flip: bool = False
    grad_accum: int = 1
    flips: bool = True
    crops: bool = True
    translate: int = 0
    patch_drop_rate: float | None = None

    @classmethod
    def of(cls, model_cfg: ModelConfig, cfg: TrainConfig, early: bool = False) -> "Settings":
        return cls(model_cfg.img_size, cfg.rotation, cfg.color_jitter, cfg.label_smoothing, cfg.ema_decay,
                   cfg.tta_flip, micro_batches(model_cfg, cfg), cfg.augment, cfg.augment and cfg.crop,
                   cfg.translate if cfg.augment else 0, cfg.early_patch_drop_rate if early else None)


# The one mechanism here for one kind of device's speed: on a CPU a step runs faster with its batch in
# micro-batches of a few hundred tokens per device, whose activations stay in the caches from one
# operation to the next (10-20% a step for the fast and cifar recipes; docs/benchmarks.md).
CPU_MICRO_BATCH_TOKENS = 512


def micro_batches(model_cfg: ModelConfig, cfg: TrainConfig) -> int:
    """How many micro-batches a step takes its batch in: --grad_accum if given; else 1, except on the
    CPU, where it is the fewest whose share on each device holds at most CPU_MICRO_BATCH_TOKENS tokens."""
    if cfg.grad_accum is not None:
        return cfg.grad_accum
    if jax.default_backend() != "cpu":
        return 1
    per_device = max(cfg.batch_size // jax.device_count(), 1)
    fits = (k for k in range(1, per_device + 1)
            if per_device % k == 0 and per_device // k * model_cfg.num_tokens <= CPU_MICRO_BATCH_TOKENS)
    return next(fits, per_device)


def train_step(state: TrainState, metrics: dict, images, labels, mask, key, schedule: Schedule, settings: Settings):
    """One optimizer update on a uint8 batch, at the schedule's rate; padding examples (mask 0) carry no weight.

    Randomness is a pure function of (key, step), so a resumed run draws what an uninterrupted one would.
    With settings.grad_accum K (`micro_batches`) the batch goes through the model as K micro-batches, one
    after the other, and their gradients are summed before the one update: the memory of a K times smaller
    batch, the update of the whole one (to float32 rounding; dropout draws its masks per micro-batch).
    """
    step_key = jax.random.fold_in(key, state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    x = augment.augment(aug_key, images, settings.img_size, settings.rotation, settings.color_jitter,
                        settings.flips, settings.crops, settings.translate)

    apply_fn = state.apply_fn
    if settings.patch_drop_rate is not None:
        apply_fn = functools.partial(apply_fn, patch_drop_rate=settings.patch_drop_rate)
    loss_fn = functools.partial(loss, apply_fn, settings.label_smoothing)
    grads, sums = gradients(loss_fn, state.params, (x, labels, mask), dropout_key, settings.grad_accum)
    metrics = _accumulate(metrics, sums)
    first_bad = (metrics["nonfinite_step"] < 0) & ~jnp.isfinite(sums["loss"])
    metrics["nonfinite_step"] = jnp.where(first_bad, state.step.astype(jnp.int32), metrics["nonfinite_step"])
    state = state.apply_gradients(grads=grads, lr=schedule(state.step))
    if settings.ema_decay:
        d = ema_decay(settings.ema_decay, state.step)
        state = state.replace(ema_params=jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, state.params))
    return state, metrics


def loss(apply_fn, label_smoothing: float, params, x, labels, mask, rng, per: str):
    """A batch's summed or mean loss (per='sum' or 'mean') in training mode, and its running sums."""
    logits = apply_fn({"params": params}, x, train=True, rngs={"dropout": rng})
    sums = _sums(logits, labels, mask, label_smoothing)
    return (sums["loss"] if per == "sum" else sums["loss"] / jnp.maximum(sums["count"], 1.0)), sums


def gradients(loss_fn, params, batch, rng, k: int):
    """(mean gradient, running sums) of a batch (x, labels, mask) under loss_fn(params, *batch, rng, per):
    whole when k is 1, else as k micro-batches in a scan. Micro-batch i holds rows i, i + k, i + 2k, ...:
    with the batch split over devices, each device holds part of every one."""
    if k == 1:
        return jax.grad(loss_fn, has_aux=True)(params, *batch, rng, "mean")
    micro = lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)  # (B, ...) -> (k, B/k, ...)
    grad_fn = jax.grad(lambda p, *inputs: loss_fn(p, *inputs, "sum"), has_aux=True)

    def add(carry, inputs):
        grads, sums = grad_fn(params, *inputs)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, (params, {"loss": 0.0, "correct": 0.0, "count": 0.0}))
    (grads, sums), _ = jax.lax.scan(add, zeros, (*map(micro, batch), jax.random.split(rng, k)))
    return jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0), grads), sums


def eval_step(params, metrics: dict, images, labels, mask, model_cfg: ModelConfig, tta_flip: bool = False):
    """Adds one batch's loss and correct predictions to the running sums. Needs no optimizer."""
    return _accumulate(metrics, _sums(infer(model_cfg, params, images, tta_flip=tta_flip)["logits"], labels, mask))


@functools.cache
def _jitted_train_step(parallel: DataParallel, settings: Settings):
    r = parallel.replicated
    # The state is donated (updated in place); the running sums are not, so that the loop can wait on
    # the sums of an earlier step while later ones run (`train.py`: how many steps are in flight).
    return jax.jit(functools.partial(train_step, settings=settings), donate_argnums=(0,), out_shardings=(r, r))


@dataclasses.dataclass(frozen=True)
class TrainFn:
    """train_step compiled for a mesh, with the run's schedule: fn(state, metrics, images, labels, mask, key)
    -> (state, metrics), the state donated. `lower` compiles ahead (the benchmark)."""

    jitted: Any
    schedule: Schedule  # on the devices

    def __call__(self, state, metrics, images, labels, mask, key):
        return self.jitted(state, metrics, images, labels, mask, key, self.schedule)

    def lower(self, state, metrics, images, labels, mask, key):
        return self.jitted.lower(state, metrics, images, labels, mask, key, self.schedule)


def jit_train_step(parallel: DataParallel, settings: Settings, schedule: Schedule) -> TrainFn:
    """train_step for these devices; one compiled program per (devices, settings, shapes), whatever the schedule."""
    return TrainFn(_jitted_train_step(parallel, settings), parallel.replicate(schedule))


def jit_eval_step(parallel: DataParallel, model_cfg: ModelConfig, tta_flip: bool = False):
    """eval_step compiled for these devices. The running sums are not donated, as in training, so that
    `evaluate` can wait on an earlier batch's."""
    return jax.jit(functools.partial(eval_step, model_cfg=model_cfg, tta_flip=tta_flip),
                   out_shardings=parallel.replicated)


def evaluate(eval_fn, parallel: DataParallel, params, batches) -> tuple[float, float]:
    """(loss, accuracy %) over `batches`, an iterable of (images, labels, mask): a whole split."""
    metrics, in_flight = parallel.replicate(zero_metrics()), collections.deque()
    for batch in batches:
        metrics = eval_fn(params, metrics, *parallel.put_batch(*batch))
        in_flight.append(metrics)
        if len(in_flight) > IN_FLIGHT:  # bounded like training's steps: see IN_FLIGHT
            jax.block_until_ready(in_flight.popleft())
    return means(metrics)
