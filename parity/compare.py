"""`python -m parity.compare`: proof that the Flax ViT and its PyTorch twin compute the same thing.

    python -m parity.compare [--workdir DIR | --checkpoint PATH] [--recipe P] [--data_dir DIR | --archive PATH]
                             [--num_images N] [--json PATH] [--train_steps N]

The JAX model comes from a workdir's best checkpoint, a PyTorch checkpoint (.pth, which the twin
loads as it is and the JAX side through the port), or else a fresh random init of --recipe. Both
models see the same CIFAR-10 test images after the same preprocessing, in float32 on the CPU (or with
--device gpu on the GPU, at the highest matmul precision: no TF32 on either side); the
table shows how far apart their logits and every named stage are. Exit status 0 when the logits agree
within the tolerance and every argmax agrees, 1 otherwise, naming the first stage that diverges.

--train_steps N also trains both from the same weights on the same N batches, dropout off: optax's
AdamW and schedule on one side, torch.optim.AdamW and CosineAnnealingLR on the other (both clipping
the gradients first when the run used --grad_clip). Accuracies and the argmax agreement are
percentages, in the table and in --json.
"""

import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from parity.lion import Lion
from parity.model import VisionTransformer as TorchViT
from parity.port import flax_to_torch, read_torch_checkpoint, torch_to_flax
from vit_jax import augment, data, step
from vit_jax.config import MODELS, RECIPES, ModelConfig, TrainConfig, recipe_of
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.model import init_params
from vit_jax.files import atomic_open
from vit_jax.workdir import check_output, load_best

# Max |logits difference| allowed, by recipe. float32 sums in another order differ by ~1e-7 relative
# per operation; the 224-pixel seed model has 12x the tokens and 12x the width of `test` to sum over.
TOLERANCE = {"test": 1e-5, "tutorial": 1e-4}
DEFAULT_TOLERANCE = 1e-4
# Training: how far the two sides' parameters part after --train_steps, relative to how far training
# moved them (|theta_jax - theta_torch| / |theta_jax - theta_0|, over all parameters but the key biases).
# Agreeing optimizers measure 0.7e-5 to 2.5e-5 on `test` (random or trained start, lr 3e-4 or 1e-3,
# 1 to 100 steps); the smallest real mismatches tried measure 80x more: weight decay 10% off 1.9e-3,
# beta2 0.99 instead of 0.999 4.3e-3, beta1 0.89 2.3e-2, eps 1e-6 5.2e-2, Adam's L2 decay 3.2.
TRAIN_TOLERANCE = 5e-4
GRAD_TOLERANCE = 1e-5  # |grad difference| / |grad| for one batch, over all parameters
LR_TOLERANCE = 1e-6  # |difference of the two schedules' rates| / peak rate (float32 vs float64 cosines)
PERTURBATION = 1e-3


def restore(a) -> tuple[ModelConfig, dict, dict | None, str, TrainConfig]:
    """(model config, Flax params, the file's state_dict or None, where they came from, run config)."""
    if a.workdir and a.checkpoint:
        raise UserError("give --workdir or --checkpoint, not both")
    if a.workdir:
        run = load_best(a.workdir)
        return (run.model_cfg, jax.device_get(run.params), None,
                f"best checkpoint of {a.workdir} (epoch {run.meta['epoch']})", run.cfg)
    cfg = TrainConfig(recipe=a.recipe)
    if a.checkpoint:
        state_dict, rest = read_torch_checkpoint(a.checkpoint)
        saved = rest.get("config")  # parity.export writes it; the tutorial's checkpoints lack it
        model_cfg = ModelConfig(**saved).validate() if isinstance(saved, dict) else MODELS[a.recipe]
        try:
            params = torch_to_flax(state_dict, model_cfg)
        except UserError as e:
            fix = ("its weights do not match the config saved with it" if isinstance(saved, dict) else
                   "pass the --recipe it was trained with")
            raise UserError(f"{a.checkpoint} does not fit recipe {recipe_of(model_cfg) or 'custom'}: {e}; "
                            f"{fix}") from None
        return model_cfg, params, state_dict, f"PyTorch checkpoint {a.checkpoint}", cfg
    model_cfg = MODELS[a.recipe]
    params = jax.device_get(init_params(model_cfg, jax.random.key(a.seed)))
    return model_cfg, params, None, f"random init of recipe {a.recipe!r} (seed {a.seed}; no checkpoint given)", cfg


def torch_twin(model_cfg: ModelConfig, params, state_dict=None) -> TorchViT:
    """The twin in eval mode, with the file's own state_dict if there is one, else the port of params."""
    with torch.device("meta"):  # no random init: every weight is assigned next
        model = TorchViT.from_config(model_cfg)
    model.load_state_dict(state_dict if state_dict is not None else flax_to_torch(params, model_cfg), assign=True)
    return model.eval()


def nchw(x, device="cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))).to(device)  # NHWC -> NCHW


def _device(model: TorchViT) -> torch.device:
    return next(model.parameters()).device


def forward_parity(flax_params, model: TorchViT, model_cfg: ModelConfig, images, labels, batch_size: int,
                   tolerance: float) -> dict:
    """Both models on the same images, each through its own inference (`step.infer` on the JAX side,
    the twin on the same preprocessing); per-stage differences, argmaxes and accuracies."""
    stats, argmax_j, argmax_t = {}, [], []
    for i in range(0, len(images), batch_size):
        stages_j = jax.device_get(step.infer_jit(model_cfg, flax_params, images[i:i + batch_size], stages=True)["stages"])
        x = augment.preprocess(images[i:i + batch_size], model_cfg.img_size)  # (B, S, S, 3)
        with torch.no_grad():
            _, stages_t = model(nchw(x, _device(model)), return_stages=True)
        stages_t = {name: st.cpu() for name, st in stages_t.items()}
        for name, st in stages_t.items():  # in model order (jax returns dicts sorted by key)
            sj = stages_j[name]
            diff = np.abs(sj - st.numpy())
            s = stats.setdefault(name, {"max_abs_diff": 0.0, "sum_abs_diff": 0.0, "count": 0, "max_abs_value": 0.0})
            s["max_abs_diff"] = max(s["max_abs_diff"], float(diff.max()))
            s["sum_abs_diff"] += float(diff.sum(dtype=np.float64))
            s["count"] += diff.size
            s["max_abs_value"] = max(s["max_abs_value"], float(np.abs(sj).max()))
        argmax_j.append(stages_j["logits"].argmax(-1))
        argmax_t.append(stages_t["logits"].numpy().argmax(-1))
    stages = {name: {"max_abs_diff": s["max_abs_diff"], "mean_abs_diff": s["sum_abs_diff"] / s["count"],
                     "max_abs_value": s["max_abs_value"]} for name, s in stats.items()}
    argmax_j, argmax_t = np.concatenate(argmax_j), np.concatenate(argmax_t)
    diverging = [n for n, s in stages.items() if s["max_abs_diff"] > tolerance]
    agreement = 100.0 * float(np.mean(argmax_j == argmax_t))
    passed = stages["logits"]["max_abs_diff"] <= tolerance and agreement == 100.0
    return {
        "max_abs_logits_diff": stages["logits"]["max_abs_diff"],
        "mean_abs_logits_diff": stages["logits"]["mean_abs_diff"],
        "argmax_agreement": agreement,
        "jax_accuracy": 100.0 * float(np.mean(argmax_j == labels)),
        "torch_accuracy": 100.0 * float(np.mean(argmax_t == labels)),
        "stages": stages,
        # Named even when the logits agree: LayerNorm hides some differences from them.
        "first_divergent_stage": (diverging or [None if passed else "logits"])[0],
        "tolerance": tolerance,
        "passed": bool(passed),
    }


def _torch_optimizer(model: TorchViT, cfg: TrainConfig):
    """torch.optim.AdamW (or SGD with momentum 0.9, with --optimizer sgd; with lion, parity.lion's) as
    vit_jax.step.make_optimizer builds optax's; without decay_all, the parameters step.decay_mask spares."""
    decay, spared = [], []
    for name, p in model.named_parameters():
        keep = cfg.decay_all or (p.ndim > 1 and name not in ("cls_token", "pos_embed"))
        (decay if keep else spared).append(p)
    groups = [{"params": decay}] + ([{"params": spared, "weight_decay": 0.0}] if spared else [])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lion":
        return Lion(groups, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def _global_norm(tensors) -> float:
    return float(np.sqrt(sum(np.sum(np.square(t, dtype=np.float64)) for t in tensors)))


def _jax_side(model_cfg: ModelConfig, cfg: TrainConfig, steps_per_epoch: int):
    """The run's schedule, and a jitted update (state, x, y) -> (state, loss, grads) made of training's own
    pieces: step.loss (dropout off, as the twin in eval mode) and TrainState.apply_gradients, the one
    AdamW step, at the schedule's rate."""
    schedule = step.Schedule.of(cfg, steps_per_epoch)

    @jax.jit
    def update(state, x, y):
        loss_fn = functools.partial(step.loss, state.apply_fn, 0.0)
        grads, sums = jax.grad(loss_fn, has_aux=True)(state.params, x, y, jnp.ones(len(y)), jax.random.key(0), "mean")
        return state.apply_gradients(grads=grads, lr=schedule(state.step)), sums["loss"] / len(y), grads

    no_dropout = dataclasses.replace(model_cfg, drop_rate=0.0, drop_path_rate=0.0, patch_drop_rate=0.0)
    return schedule, update, lambda params: step.create_train_state(no_dropout, cfg, params)


def _drift(start_params, final_params, model: TorchViT, model_cfg: ModelConfig) -> dict:
    """How far the two sides' parameters parted, against how far training moved them (key biases apart)."""
    start = flax_to_torch(start_params, model_cfg)
    final_t = {name: value.cpu() for name, value in model.state_dict().items()}
    apart_sq = moved_sq = key_bias = 0.0
    max_diff = {}
    for name, final_j in flax_to_torch(final_params, model_cfg).items():
        diff, moved = (final_j - final_t[name]).abs(), final_j - start[name]
        if name.endswith("attn.qkv.bias"):  # (3 D,): q | k | v
            k = slice(model_cfg.embed_dim, 2 * model_cfg.embed_dim)
            key_bias = max(key_bias, float(diff[k].max()))
            diff[k], moved[k] = 0.0, 0.0
        max_diff[name] = float(diff.max())
        apart_sq += float(diff.double().square().sum())
        moved_sq += float(moved.double().square().sum())
    worst = max(max_diff, key=max_diff.get)
    return {"max_abs_param_diff": max_diff[worst], "max_param_diff_key": worst, "max_abs_key_bias_diff": key_bias,
            "param_drift": (apart_sq / moved_sq) ** 0.5}


def train_parity(flax_params, model: TorchViT, model_cfg: ModelConfig, cfg: TrainConfig, images, labels,
                 steps: int, batch_size: int, steps_per_epoch: int) -> dict:
    """Trains both sides from the same weights on the same batches; loss curves and differences.

    Dropout is off (eval mode on both sides) and the inputs are preprocessed once, not augmented, so
    the two see identical arrays. Adam divides each gradient by its running magnitude: an element
    whose gradient is within float32 noise of 0 moves by up to ~lr on one side and differently on
    the other. That happens to a few elements by chance, and to every attention key bias always (it
    adds q.b_k to all of a query's logits alike, which softmax ignores, so its exact gradient is 0).
    Hence the verdict is on the parameters' drift apart in norm, relative to how far they moved, with
    the key biases reported apart; a mismatched optimizer or schedule shifts every element.
    """
    schedule, jax_update, new_state = _jax_side(model_cfg, cfg, steps_per_epoch)
    optimizer = _torch_optimizer(model, cfg)
    # PyTorch's CosineAnnealingLR(T_max=epochs), stepped once per epoch: what epoch_cosine mirrors.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    state = new_state(jax.tree.map(jnp.asarray, flax_params))
    rows, grad_rel = [], None
    for i in range(steps):
        idx = np.arange(i * batch_size, (i + 1) * batch_size) % len(images)  # cycles a short split
        x, y = np.asarray(augment.preprocess(images[idx], model_cfg.img_size)), labels[idx]
        lr_jax, lr_torch = float(schedule(i)), optimizer.param_groups[0]["lr"]
        state, loss_j, grads_j = jax_update(state, x, y)
        optimizer.zero_grad()
        loss_t = F.cross_entropy(model(nchw(x, _device(model))), torch.from_numpy(y.astype(np.int64)).to(_device(model)))
        loss_t.backward()
        if i == 0:  # the gradients of one batch, before the optimizers' paths can part
            gj = flax_to_torch(grads_j, model_cfg)
            gt = {n: p.grad.cpu() for n, p in model.named_parameters()}
            grad_rel = _global_norm((gj[n] - gt[n]).numpy() for n in gj) / _global_norm(g.numpy() for g in gj.values())
            apart = sum(int((gj[n].sign() != gt[n].sign()).sum()) for n in gj)
            signs_apart = apart / sum(g.numel() for g in gj.values())
        if cfg.grad_clip:  # as optax.clip_by_global_norm before AdamW on the JAX side
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if (i + 1) % steps_per_epoch == 0:
            scheduler.step()
        rows.append({"step": i + 1, "lr_jax": lr_jax, "lr_torch": lr_torch,
                     "jax_loss": float(loss_j), "torch_loss": loss_t.item()})
    drift = _drift(flax_params, state.params, model, model_cfg)
    lr_diff = max(abs(r["lr_jax"] - r["lr_torch"]) for r in rows) / cfg.lr
    # Lion steps every element by the learning rate times the sign of its momentum: a gradient at float32
    # noise (a dead GELU unit's weights, the key biases) gets a whole step of either sign on each side,
    # and the paths part at once. Its update is checked given the same gradients instead (tests).
    drift_judged = cfg.optimizer != "lion"
    return {
        "steps": steps, "batch_size": batch_size, "num_images": len(images), "steps_per_epoch": steps_per_epoch,
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, "losses": rows,
        "max_abs_loss_diff": max(abs(r["jax_loss"] - r["torch_loss"]) for r in rows),
        "max_lr_diff_over_peak": lr_diff, "lr_tolerance": LR_TOLERANCE,
        "grad_rel_diff": grad_rel, "grad_tolerance": GRAD_TOLERANCE, "first_grad_signs_apart": signs_apart,
        **drift, "tolerance": TRAIN_TOLERANCE, "drift_judged": drift_judged,
        "passed": bool(grad_rel <= GRAD_TOLERANCE and lr_diff <= LR_TOLERANCE
                       and (drift["param_drift"] <= TRAIN_TOLERANCE or not drift_judged)),
    }


def print_forward(r: dict):
    print(f"{'stage':<10} {'max|diff|':>11} {'mean|diff|':>11} {'max|value|':>11}")
    for name, s in r["stages"].items():
        mark = "  <- diverges" if name == r["first_divergent_stage"] else ""
        print(f"{name:<10} {s['max_abs_diff']:>11.3e} {s['mean_abs_diff']:>11.3e} {s['max_abs_value']:>11.3e}{mark}")
    print(f"argmax agreement {r['argmax_agreement']:.2f}% | accuracy: JAX {r['jax_accuracy']:.2f}%, "
          f"PyTorch {r['torch_accuracy']:.2f}%")
    verdict = "PASS" if r["passed"] else f"FAIL (first divergent stage: {r['first_divergent_stage']})"
    print(f"{verdict}: max |logits diff| {r['max_abs_logits_diff']:.3e} (tolerance {r['tolerance']:g}), "
          f"argmax agreement {r['argmax_agreement']:.2f}% (needs 100%)")
    if r["passed"] and r["first_divergent_stage"]:
        print(f"note: from stage {r['first_divergent_stage']} on, the stages differ by more than the tolerance, "
              f"though the logits agree")


def print_train(t: dict):
    print(f"\nTraining {t['steps']} steps, batch {t['batch_size']} (in turn from the {t['num_images']} images, "
          f"not augmented), lr {t['lr']:g}, weight decay {t['weight_decay']:g}, epoch_cosine over {t['epochs']} "
          f"epochs of {t['steps_per_epoch']} steps, dropout off")
    print(f"{'step':>5} {'lr jax':>10} {'lr torch':>10} {'loss jax':>11} {'loss torch':>11} {'|diff|':>10}")
    for r in t["losses"]:
        print(f"{r['step']:>5} {r['lr_jax']:>10.3e} {r['lr_torch']:>10.3e} {r['jax_loss']:>11.6f} "
              f"{r['torch_loss']:>11.6f} {abs(r['jax_loss'] - r['torch_loss']):>10.2e}")
    print(f"gradients of the first batch: |diff| / |grad| = {t['grad_rel_diff']:.2e} "
          f"(tolerance {t['grad_tolerance']:g})")
    print(f"largest parameter difference after {t['steps']} steps: {t['max_abs_param_diff']:.3e} in "
          f"{t['max_param_diff_key']} (lr {t['lr']:g}); in the attention key biases {t['max_abs_key_bias_diff']:.3e}")
    verdict = "PASS" if t["passed"] else "FAIL"
    if not t["drift_judged"]:
        print(f"{verdict} on the gradients; parameters parted by {t['param_drift']:.2e} of how far they moved, not "
              f"judged: Lion steps by a sign, and {100 * t['first_grad_signs_apart']:.2f}% of the first gradients "
              f"(float32 noise around 0) differ in sign between the two sides. Lion's update given the same "
              f"gradients is the twin's: tests/test_parity.py")
        return
    print(f"{verdict}: parameters parted by {t['param_drift']:.2e} of how far they moved "
          f"(tolerance {t['tolerance']:g}; key biases not judged: their exact gradient is 0, see train_parity)")


def _devices(which: str):
    """(JAX device, PyTorch device) for --device; on a GPU, PyTorch's TF32 shortcuts are turned off too."""
    if which == "cpu":
        return jax.devices("cpu")[0], "cpu"
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        raise UserError(f"--device gpu needs a GPU that both JAX ({jax.default_backend()}) and PyTorch "
                        f"(cuda {'found' if torch.cuda.is_available() else 'not found'}) can use")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return jax.devices()[0], "cuda"


@cli
def main(argv=None) -> int:
    parser = CommandParser(prog="python -m parity.compare", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--workdir", default=None, help="compare this training run's best model")
    parser.add_argument("--checkpoint", default=None, help="compare this PyTorch checkpoint (.pth)")
    parser.add_argument("--recipe", choices=list(RECIPES), default="test",
                        help="the architecture of a random init, or of a .pth without a saved config")
    parser.add_argument("--seed", type=int, default=0, help="random init's seed (no checkpoint)")
    data.add_source_arguments(parser)
    parser.add_argument("--num_images", type=int, default=256, help="the first N test images")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"max |logits diff| (default: {TOLERANCE} by recipe, else {DEFAULT_TOLERANCE})")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--perturb", default=None, metavar="KEY",
                        help=f"self-test: add noise of std {PERTURBATION:g} to one weight tensor of the "
                             f"PyTorch side (a state_dict key, e.g. blocks.0.attn.qkv.weight); the "
                             f"comparison must fail")
    parser.add_argument("--train_steps", type=int, default=0, help="also train both for N steps")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="where both sides compute, at the highest float32 precision (default: cpu)")
    parser.add_argument("--steps_per_epoch", type=int, default=5,
                        help="epoch length for the schedules of --train_steps (short, so the rate moves)")
    a = parser.parse_args(argv)
    if a.num_images <= 0 or a.batch_size <= 0 or a.train_steps < 0 or a.steps_per_epoch <= 0:
        raise UserError("num_images, batch_size and steps_per_epoch must be positive, train_steps non-negative")
    if a.tolerance is not None and not 0 <= a.tolerance < float("inf"):
        raise UserError(f"--tolerance must be a non-negative number, got {a.tolerance}")
    if a.json:
        check_output(a.json, "--json")

    jax_device, torch_device = _devices(a.device)
    # float32 everywhere, at full precision: on a GPU, XLA would otherwise use TF32 matmuls.
    with jax.default_device(jax_device), jax.default_matmul_precision("highest"):
        model_cfg, params, state_dict, source, cfg = restore(a)
        model_cfg = dataclasses.replace(model_cfg, dtype="float32")
        cfg = dataclasses.replace(cfg, schedule="epoch_cosine", warmup_epochs=0.0)  # what torch mirrors
        if a.train_steps > cfg.epochs * a.steps_per_epoch:  # past T_max PyTorch's cosine rises again
            raise UserError(f"--train_steps {a.train_steps} is more than the schedule's {cfg.epochs} epochs "
                            f"of {a.steps_per_epoch} steps: raise --steps_per_epoch")
        recipe = recipe_of(model_cfg)
        tolerance = a.tolerance if a.tolerance is not None else TOLERANCE.get(recipe, DEFAULT_TOLERANCE)
        model = torch_twin(model_cfg, params, state_dict).to(torch_device)
        if a.perturb:
            weights = dict(model.named_parameters())
            if a.perturb not in weights:
                raise UserError(f"--perturb {a.perturb!r} is not a weight of the model; one of: "
                                f"{', '.join(weights)}")
            # Random, not uniform: LayerNorm cancels a constant added to every channel, and so
            # would make many weights look unperturbed at the logits.
            noise = torch.randn(weights[a.perturb].shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                weights[a.perturb].add_(PERTURBATION * noise)
        images, labels = data.load_split("test", limit=a.num_images, **data.source(a, cfg))
        print(f"JAX: {source}; model {recipe or 'custom'} ({model_cfg.img_size}px, patch {model_cfg.patch_size}, "
              f"embed {model_cfg.embed_dim}, depth {model_cfg.depth})")
        print(f"PyTorch twin: the same weights{f', with {a.perturb} perturbed' if a.perturb else ''}; "
              f"{len(images)} CIFAR-10 test images, float32 on the {a.device.upper()}\n")
        result = {"source": source, "recipe": recipe, "config": dataclasses.asdict(model_cfg),
                  "num_images": len(images)}
        result.update(forward_parity(params, model, model_cfg, images, labels, a.batch_size, tolerance))
        print_forward(result)
        passed = result["passed"]
        if a.train_steps:
            result["train"] = train_parity(params, model, model_cfg, cfg, images, labels,
                                           a.train_steps, a.batch_size, a.steps_per_epoch)
            print_train(result["train"])
            passed = passed and result["train"]["passed"]
    result["passed"] = bool(passed)
    if a.json:
        with atomic_open(a.json) as f:
            json.dump(result, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
