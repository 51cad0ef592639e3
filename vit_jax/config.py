"""Configuration: the architecture (`ModelConfig`), the run (`TrainConfig`), and the named defaults of both (`RECIPES`).

Both are frozen dataclasses whose every field carries its own one-line help and, for the run,
whether it may change when a run is resumed (`field(default, help, resumable=True)`). `parse_args`
builds them from the command line, with a flag for every field. A mistyped flag or an impossible
value fails at once with a message that says what to change.
"""

import argparse
import dataclasses
import math
import types
import typing

from vit_jax.errors import CommandParser, UserError


def field(default, help: str, *, resumable: bool = False):
    """A config field with its flag's help text; `resumable`: may differ when a run is resumed."""
    return dataclasses.field(default=default, metadata={"help": help, "resumable": resumable})


def _check_finite(cfg):
    """Python's float() takes 'nan' and 'inf', which every range check below lets through (nan compares
    false both ways) and which would only show up later, as a loss that is not finite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ViT architecture. The same object builds the Flax model and its PyTorch twin."""

    img_size: int = field(224, "input side in pixels; CIFAR-10's 32x32 images are resized to it")
    patch_size: int = field(16, "side of the square patches the image is cut into")
    num_classes: int = field(10, "output classes")
    stem: str = field("patch", "how the image becomes tokens: patch (a linear map of each patch, the ViT's) or conv "
                               "(log2(patch_size) 3x3 convolutions of stride 2, each followed by GELU, their widths "
                               "doubling up to embed_dim, then a linear map of each pixel: timm's HybridEmbed over "
                               "that backbone; Xiao et al. 2021's convolutional stem)")
    embed_dim: int = field(384, "token width")
    depth: int = field(6, "transformer blocks")
    num_heads: int = field(6, "attention heads per block")
    mlp_ratio: float = field(4.0, "MLP hidden width / embed_dim")
    drop_rate: float = field(0.0, "dropout after the embedding, attention projection and MLP")
    drop_path_rate: float = field(0.0, "stochastic depth, rising linearly to this in the last block")
    patch_drop_rate: float = field(0.0, "in training, drop this fraction of the patch tokens, a random subset per "
                                        "image, before the blocks (timm's patch_drop_rate, PatchDropout): fewer "
                                        "tokens, a cheaper step")
    class_token: bool = field(True, "prepend a learned class token (timm's class_token)")
    global_pool: str = field("token", "what the head reads: token (the class token after the final norm) or avg "
                                      "(the mean of the patch tokens, then its own norm: timm's global_pool='avg')")
    dtype: str = field("float32", "compute dtype (parameters stay float32): float32 or bfloat16")
    attention: str = field("auto", "attention kernel: auto (cuDNN's fused attention on an NVIDIA GPU in "
                                   "bfloat16, else XLA's), xla or cudnn", resumable=True)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def stem_widths(self) -> list[int]:
        """The conv stem's layer widths: log2(patch_size) of them, doubling up to embed_dim (8, 128: 32 64 128)."""
        layers = self.patch_size.bit_length() - 1
        return [self.embed_dim >> (layers - 1 - i) for i in range(layers)]

    @property
    def num_tokens(self) -> int:
        """Patches, and the class token if there is one."""
        return self.num_patches + int(self.class_token)

    def patches_kept(self, rate: float | None = None) -> int:
        """The patch tokens each image keeps in training at this patch drop rate (default: the model's):
        timm's int(N (1 - rate)), at least one."""
        rate = self.patch_drop_rate if rate is None else rate
        return max(1, int(self.num_patches * (1.0 - rate))) if rate else self.num_patches

    def validate(self) -> "ModelConfig":
        _check_finite(self)
        for name in ("img_size", "patch_size", "num_classes", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise UserError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: "
                f"choose sizes such that the patches tile the image")
        if self.stem not in ("patch", "conv"):
            raise UserError(f"stem must be patch or conv, got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise UserError(f"the conv stem halves the image patch_size = 2^k times: patch_size must be a power of "
                            f"2, at least 2, got {self.patch_size}")
        if self.stem == "conv" and self.embed_dim % (self.patch_size // 2):
            raise UserError(f"the conv stem's widths halve from embed_dim {self.embed_dim} in each of its "
                            f"{self.patch_size.bit_length() - 1} layers: choose an embed_dim divisible by "
                            f"{self.patch_size // 2}")
        if self.embed_dim % self.num_heads:
            raise UserError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}: "
                f"each head takes embed_dim / num_heads channels")
        if self.mlp_ratio <= 0 or int(self.embed_dim * self.mlp_ratio) <= 0:
            raise UserError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("drop_rate", "drop_path_rate", "patch_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.global_pool not in ("token", "avg"):
            raise UserError(f"global_pool must be token or avg, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise UserError("global_pool token reads the class token: use --global_pool avg with --no-class_token")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise UserError(f"attention must be auto, xla or cudnn, got {self.attention!r}")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the PyTorch tutorial's recipe."""

    recipe: str = field("tutorial", "the named defaults of the model and the run (see RECIPES); every flag "
                                    "overrides them", resumable=True)
    epochs: int = field(20, "passes over the training split")
    batch_size: int = field(64, "global batch, split over all devices of all processes")
    grad_accum: int | None = field(None, "average the gradients of this many micro-batches of batch_size / "
                                         "grad_accum per update: the memory of the smaller batch, the result of the "
                                         "whole one. Not given: 1, but on the CPU micro-batches of at most 512 tokens "
                                         "per device, which run faster in its caches")
    cpu_devices: int = field(0, "on a CPU without accelerator, the XLA devices the batch is split over: 0, one "
                                "per core (as many as divide the batch; each core takes a share, about 1.3x the "
                                "images/s of one device on 2 cores); 1: one device", resumable=True)
    lr: float = field(3e-4, "peak learning rate of the optimizer")
    optimizer: str = field("adamw", "adamw (torch.optim.AdamW's); sgd: SGD with momentum 0.9, as "
                                    "google-research/vision_transformer fine-tunes (--recipe finetune); lion: "
                                    "optax.lion (Chen et al. 2023: the sign of the momentum, b1 0.9, b2 0.99), "
                                    "usually with a 3-10x smaller lr and a larger weight_decay than adamw's")
    weight_decay: float = field(0.1, "AdamW's (and Lion's) decoupled weight decay; with sgd, weight_decay * params "
                                     "added to the gradient, as torch.optim.SGD's")
    schedule: str = field("epoch_cosine", "epoch_cosine: PyTorch's CosineAnnealingLR stepped per epoch; "
                                          "cosine: per step")
    warmup_epochs: float = field(0.0, "linear warm-up before the cosine (schedule=cosine only)")
    decay_all: bool = field(True, "decay every parameter as torch.optim.AdamW does; --no-decay_all spares "
                                  "biases, norms, embeddings")
    seed: int = field(42, "seeds initialization, shuffling and augmentation")
    workdir: str = field("checkpoints", "where config, metrics and checkpoints go; rerunning resumes from it",
                         resumable=True)
    data_dir: str | None = field(None, "tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
                                 resumable=True)
    archive: str | None = field(None, "read CIFAR-10 from this cifar-10-binary.tar.gz (or its folder) with numpy "
                                      "instead of tfds: no TensorFlow needed", resumable=True)
    patience: int = field(0, "stop after this many epochs without a better test accuracy (0: never)",
                          resumable=True)
    train_limit: int | None = field(None, "use only the first N training examples")
    test_limit: int | None = field(None, "use only the first N test examples")
    label_smoothing: float = field(0.0, "train against (1 - s) one-hot + s / classes (0: plain cross-entropy)")
    grad_clip: float = field(0.0, "cap the gradients' global norm at this before each update (0: never)")
    ema_decay: float = field(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999) "
                                  "and evaluate, keep and export it (0: off)")
    early_patch_drop_rate: float | None = field(None, "a token schedule: in the first --early_fraction of the run's "
                                                      "updates, drop this fraction of the patch tokens instead of "
                                                      "--patch_drop_rate (fewer tokens early, cheaper steps; more "
                                                      "late); switched at an epoch's start, once (default: off)")
    early_fraction: float = field(0.5, "with --early_patch_drop_rate, the part of the planned updates it lasts")
    tta_flip: bool = field(False, "evaluate on each test image and its mirror image, averaging the logits")
    time_budget: float | None = field(None, "minutes from the command's start to its end: the run measures its "
                                            "own speed and chooses the epochs that fit (they go to config.json)")
    augment: bool = field(True, "random horizontal flip and random crop with padding 4, the tutorial's; "
                                "--no-augment trains on the images as they are")
    crop: bool = field(True, "with --augment, the random crop too; --no-crop: the random flip alone")
    translate: int = field(0, "with --augment, shift each image by up to this many pixels each way, its mirrored "
                              "edge filling the gap (airbench's random translation; 0: off)")
    rotation: float = field(0.0, "random rotation up to this many degrees (the tutorial's tip: 15)")
    color_jitter: float = field(0.0, "random brightness, contrast and saturation of this strength (tip: 0.2)")
    log_every: int = field(100, "print the running loss and accuracy every N batches", resumable=True)
    init_from: str | None = field(None, "start from these parameters (.npz from python -m parity.convert) "
                                        "instead of a random init")
    save_every: int = field(0, "also save the latest state every N batches (0: at the end of each epoch only)",
                            resumable=True)
    fresh: bool = field(False, "start over: move the workdir's checkpoints and metrics aside, never delete them",
                        resumable=True)
    tensorboard: bool = field(False, "also write the scalars as TensorBoard event files in WORKDIR/tensorboard",
                              resumable=True)
    coordinator_address: str | None = field(None, "many processes: HOST:PORT of process 0, which coordinates "
                                                   "(default: $JAX_COORDINATOR_ADDRESS)", resumable=True)
    num_processes: int | None = field(None, "many processes: how many take part (default: $JAX_NUM_PROCESSES, or "
                                            "what SLURM or Open MPI says, else 1); a resumed run needs the same",
                                      resumable=True)  # the checkpoint records how many wrote it
    process_id: int | None = field(None, "many processes: this one's index, 0 to num_processes - 1 (default: "
                                         "$JAX_PROCESS_ID, or the cluster's)", resumable=True)
    heartbeat_timeout: int = field(60, "many processes: seconds without a sign of life after which the others stop "
                                       "(and at most to wait for the coordinator to answer)", resumable=True)

    def validate(self) -> "TrainConfig":
        _check_finite(self)
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size", "log_every", "grad_accum", "heartbeat_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cpu_devices < 0:
            raise UserError(f"cpu_devices must be 0 (one per core) or positive, got {self.cpu_devices}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd", "lion"):
            raise UserError(f"optimizer must be adamw, sgd or lion, got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.schedule not in ("epoch_cosine", "cosine"):
            raise UserError(f"schedule must be epoch_cosine or cosine, got {self.schedule!r}")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.schedule != "cosine"):
            raise UserError("warmup_epochs needs --schedule cosine and must be non-negative")
        if self.warmup_epochs >= self.epochs:
            raise UserError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs}): pass "
                            f"--warmup_epochs {self.epochs / 2:g}, or more --epochs")
        if self.patience < 0:
            raise UserError(f"patience must be 0 (off) or positive, got {self.patience}")
        if self.save_every < 0:
            raise UserError(f"save_every must be 0 (epoch ends only) or positive, got {self.save_every}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rotation < 0 or self.color_jitter < 0:
            raise UserError("rotation and color_jitter must be non-negative")
        if self.translate < 0:
            raise UserError(f"translate must be 0 (off) or a positive number of pixels, got {self.translate}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip < 0:
            raise UserError(f"grad_clip must be 0 (off) or positive, got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.early_patch_drop_rate is not None and not 0.0 <= self.early_patch_drop_rate < 1.0:
            raise UserError(f"early_patch_drop_rate must be in [0, 1), got {self.early_patch_drop_rate}")
        if not 0.0 < self.early_fraction < 1.0:
            raise UserError(f"early_fraction must be between 0 and 1, got {self.early_fraction}")
        if self.grad_accum and self.batch_size % self.grad_accum:
            raise UserError(f"batch_size {self.batch_size} cannot be split into {self.grad_accum} micro-batches: "
                            f"use a multiple of {self.grad_accum}")
        if self.num_processes is not None and self.num_processes <= 0:
            raise UserError(f"num_processes must be positive, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
            raise UserError(f"process_id must be in 0..num_processes - 1, got {self.process_id}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UserError(f"time_budget must be a positive number of minutes, got {self.time_budget}")
        return self


def suggest_lr(lr: float) -> float:
    """The learning rate to suggest after `lr` diverged: a tenth of it, but at most 1e-3, the highest
    rate of the recipes (fast's). A tenth of a rate far too high (1e6) would diverge again."""
    return min(lr / 10, 1e-3)


# The named defaults, of the model and the run alike: a recipe sets the fields it names, the
# dataclasses' defaults the rest, and every flag overrides both. The runs behind each recipe are in
# docs/recipes.md.
RECIPES = {
    # The PyTorch tutorial's: its 224-pixel model (ModelConfig's defaults, 11,022,730 parameters), batch
    # 64, 20 epochs, AdamW 3e-4 with weight decay 0.1 on every parameter, cosine stepped per epoch, flip
    # and padded crop (TrainConfig's defaults).
    "tutorial": {},
    # The tutorial's run on native 32x32 input with 4x4 patches (65 tokens instead of 197): trains on a CPU.
    "cifar": {"img_size": 32, "patch_size": 4, "embed_dim": 256, "depth": 6, "num_heads": 4},
    # The best test accuracy in minutes rather than hours. The model: 16 tokens (an 8x8 grid's worth:
    # about 4x the images per second of 64), made by a convolutional stem (three 3x3 stride-2 layers,
    # about as fast on a CPU as the linear patch projection and 6 points better in 10 minutes), narrow,
    # a quarter of the tokens dropped in training, the mean of the tokens to the head. The run: batch
    # 64 (more updates, and on a CPU more images per second than 256), the random flip and a 2-pixel
    # translation (the padded crop of 4 costs more than it gives in short runs), label smoothing,
    # clipping, test-time flip. The runs behind each choice: docs/recipes.md.
    "fast": {"img_size": 32, "patch_size": 8, "stem": "conv", "embed_dim": 128, "depth": 6, "num_heads": 2,
             "mlp_ratio": 2.0, "class_token": False, "global_pool": "avg", "patch_drop_rate": 0.25,
             "epochs": 10, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine",
             "warmup_epochs": 1.0, "decay_all": False, "label_smoothing": 0.1, "grad_clip": 1.0, "tta_flip": True,
             "augment": True, "crop": False, "translate": 2},
    # Tiny, for tests.
    "test": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
    # The standard sizes (Dosovitskiy et al. 2021; Touvron et al. 2021 for Ti) at 224/16, the tutorial's run.
    "vit_ti16": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_s16": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_b16": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    # Fine-tuning a pretrained model (python -m parity.convert, then --init_from; docs/finetune.md): as
    # google-research/vision_transformer fine-tunes, SGD with momentum 0.9, no weight decay, batch 512,
    # a linear warm-up then a cosine to 0, gradients clipped at global norm 1, a few hundred steps (5
    # epochs of CIFAR-10: 490). The random flip without the crop: a fast-recipe model (trained without
    # it) fine-tuned 2 minutes lost 3.8 points with the crop and gained 0.9 without (docs/finetune.md);
    # add --crop for a model pretrained with crops and a longer run. The model is the checkpoint's:
    # parity.convert prints its flags.
    "finetune": {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0, "batch_size": 512, "epochs": 5,
                 "schedule": "cosine", "warmup_epochs": 0.5, "grad_clip": 1.0, "crop": False},
}


def model_of(recipe: str) -> ModelConfig:
    """The architecture a recipe trains."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in RECIPES[recipe].items() if k in names})


MODELS = {name: model_of(name) for name in RECIPES}  # each recipe's model, for the commands that need one


def recipe_of(model: ModelConfig) -> str | None:
    """The name of the recipe whose model this is, if any (the compute dtype and kernel aside)."""
    plain = dataclasses.replace(model, dtype="float32", attention="auto")
    return next((name for name, m in MODELS.items() if m == plain), None)


def recipe_defaults(name: str) -> tuple["TrainConfig", ModelConfig]:
    """The configs a recipe gives when no other flag is passed."""
    return parse_args(["--recipe", name])


def resumable(f: dataclasses.Field) -> bool:
    """Whether a config field may change between runs of one training (all others shape its results)."""
    return f.metadata["resumable"]


def model_config(train: TrainConfig, **overrides) -> ModelConfig:
    """The recipe's architecture with the given fields replaced (None means keep)."""
    train.validate()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(MODELS[train.recipe], **overrides).validate()


def _flag_type(annotation):
    """int, float, str or bool: the annotation without its `| None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def _add_fields(parser, cls, defaults_none: bool):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata["help"] + ("" if defaults_none else " (default: %(default)s)")
        default = None if defaults_none else f.default
        kind = _flag_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif f.name == "recipe":
            parser.add_argument("--recipe", choices=list(RECIPES), default=default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, metavar=kind.__name__.upper(),
                                help=help_text)


def add_model_arguments(parser, title: str = "model (overrides the recipe's)"):
    """A flag for every ModelConfig field, default None (keep the recipe's): for model_config(**args)."""
    _add_fields(parser.add_argument_group(title), ModelConfig, defaults_none=True)


def build_parser(description: str) -> argparse.ArgumentParser:
    """A parser with a flag for every TrainConfig and ModelConfig field."""
    parser = CommandParser(prog="python -m vit_jax.train", description=description,
                                     allow_abbrev=False)  # --epoch is a typo
    _add_fields(parser.add_argument_group("run"), TrainConfig, defaults_none=False)
    add_model_arguments(parser)
    return parser


def parse_args(argv=None, description: str = "Train a ViT on CIFAR-10.") -> tuple[TrainConfig, ModelConfig]:
    """Command line -> validated (TrainConfig, ModelConfig). Unknown flags exit with argparse's message.

    --recipe NAME first sets the defaults of the flags it names (run and model alike); the flags
    given on the command line then override them."""
    parser = build_parser(description)
    first = CommandParser(prog="python -m vit_jax.train", add_help=False, allow_abbrev=False)
    first.add_argument("--recipe", choices=list(RECIPES), default="tutorial")
    parser.set_defaults(**RECIPES[first.parse_known_args(argv)[0].recipe])
    args = vars(parser.parse_args(argv))
    train = TrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(TrainConfig)})
    model = model_config(train, **{f.name: args[f.name] for f in dataclasses.fields(ModelConfig)})
    return train, model


def to_dict(train: TrainConfig, model: ModelConfig) -> dict:
    return {"train": dataclasses.asdict(train), "model": dataclasses.asdict(model)}
