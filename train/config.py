"""The trainer's one typed config: sections with defaults, help and allowed values.

YAML first, then dotted overrides from the command line (`optim.lr=0.2`); an unknown key or
a value of the wrong type is an error naming the key and what it accepts, before any work starts.
The resolved config is written into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from pipeline.auto_augment import AUTO_AUGMENTS
from pipeline.loader import BACKENDS, LoaderConfig
from pipeline.transforms import DEFAULT_CROP_PCT, INTERPOLATIONS
from shards.text_file import read_text_file
from train.loss import LOSSES
from train.model import FIXED_SIZE_KEYWORDS, MODEL_NAMES, RESNET_FAMILY
from train.step import AUTOCAST_DTYPES

SCHEDULES = ("cosine", "linear", "step")
OPTIMIZERS = ("sgd", "adamw", "rmsprop", "lamb")
WARMUPS = ("linear", "constant")
STOP_METRICS = {"acc1": "max", "acc5": "max", "loss": "min"}  # which way is better


def option(default, help: str, choices=None, **kw):
    """A config field with its help text and, optionally, the values it allows."""
    factory = kw.pop("default_factory", None)
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = option("resnet18", "torchvision classification model (torchvision.models.list_models())", MODEL_NAMES)
    zero_init_residual: bool | None = option(
        None, "zero the last BatchNorm of each residual block (ResNet family only; unset: yes for it)"
    )
    compile: bool = option(False, "torch.compile the model")
    drop_path: float | None = option(
        None,
        "stochastic depth: the rate at which the last residual block is skipped per sample, rising linearly from 0 "
        "in the first (timm's drop_path_rate; ResNet family, convnext_*, efficientnet_*; unset: the builder's "
        "default, none for ResNets)",
    )
    blurpool: bool = option(False, "blur the input of each strided convolution (FFCV's BlurPool; costs step time)")
    init_from: str | None = option(
        None,
        "start from these weights (a state_dict file, e.g. of tools.export_weights, or a checkpoint's model), with "
        "a fresh optimizer and schedule; --resume continues a run instead",
    )


@dataclass
class DataConfig:
    shards: str | None = option(None, "shard directory written by tools.make_shards")
    backend: str = option("dali-gpu", "data pipeline", BACKENDS)
    val_backend: str | None = option(
        None, "data pipeline for the val split (none: data.backend), e.g. dali-gpu beside torch-uint8", BACKENDS
    )
    batch_size: int = option(256, "images per step on each rank (per micro-batch with accumulation)")
    workers: int = option(8, "DALI threads, or DataLoader workers for the torch backend")
    hw_decoder_load: float = option(1.0, "share of JPEGs for the hardware decoder (dali-gpu)")
    prefetch: int = option(2, "batches prepared ahead of the step")
    crop_pct: float = option(DEFAULT_CROP_PCT, "val: resize to size / crop_pct, then center crop")
    interpolation: str = option(
        "bilinear",
        "filter of the train and val resizes (torchvision's --interpolation; its Swin and MaxViT recipes: bicubic)",
        INTERPOLATIONS,
    )
    aug_repeats: int = option(
        1, "repeated augmentation: each epoch's train samples go to this many ranks, each augmenting its own copy"
    )
    auto_augment: str = option(
        "none",
        "train: trivial_augment_wide (TrivialAugment Wide after the flip, as torchvision's recipes), rand_augment "
        "(torchvision's), auto_augment_imagenet (AutoAugment's ImageNet policy, torchvision's) or rand_augment_timm "
        "(timm's rand-mM-nN-mstdS-inc1)",
        AUTO_AUGMENTS,
    )
    rand_augment_ops: int = option(
        2, "rand_augment(_timm): operations drawn for each image, in a row (torchvision's and timm's: 2)"
    )
    rand_augment_magnitude: int = option(
        9, "rand_augment: magnitude bin of every operation, 0-30 (torchvision: 9); rand_augment_timm: timm's m, 0-10"
    )
    rand_augment_magnitude_std: float = option(
        0.5, "rand_augment_timm: each operation's magnitude is drawn around m with this deviation (timm's mstd)"
    )


@dataclass
class ResolutionConfig:
    """Progressive resizing (FFCV): train size ramps linearly from min to max between two epochs."""

    min: int = option(224, "train image size up to start_ramp")
    max: int = option(224, "train image size from end_ramp on")
    start_ramp: int = option(0, "first epoch of the ramp")
    end_ramp: int = option(0, "epoch at which the ramp reaches max")
    step: int = option(32, "sizes are rounded to a multiple of this")
    val: int = option(224, "validation center-crop size")


@dataclass
class OptimConfig:
    optimizer: str = option(
        "sgd",
        "sgd (with momentum, nesterov), adamw (betas 0.9, 0.999; decoupled decay), rmsprop (alpha 0.9, eps "
        "0.0316, with momentum: torchvision's, for its MobileNet recipes) or lamb (timm's: betas 0.9, 0.999, eps "
        "1e-6, decay inside the trust-ratio update; timm's also clips the gradient norm at 1: optim.grad_clip=1)",
        OPTIMIZERS,
    )
    lr: float = option(0.1, "peak learning rate for a global batch of lr_batch images")
    lr_batch: int = option(256, "global batch `lr` is given for; scaled linearly to the real one (0: lr as is)")
    momentum: float = option(0.9, "SGD and RMSprop momentum")
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    weight_decay: float = option(
        5e-5,
        "weight decay (SGD: L2 in the gradient; AdamW: decoupled, typically 0.05; LAMB: in the update its "
        "trust ratio scales, timm's ResNet recipes 0.01-0.02)",
    )
    no_decay_bn_bias: bool = option(True, "no weight decay on norm weights, biases and transformer embeddings")
    loss: str = option(
        "cross_entropy",
        "cross_entropy, or bce: a sigmoid per class (timm's --bce-loss; the val loss stays cross-entropy)",
        LOSSES,
    )
    label_smoothing: float = option(0.1, "label smoothing: target * (1 - s) + s / classes, for either loss")
    bce_target_threshold: float | None = option(
        None, "bce: target probabilities above this become 1, the rest 0 (timm's --bce-target-thresh; unset: off)"
    )
    mixup_alpha: float = option(0.0, "MixUp: mix each batch with itself rolled, weights ~ Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = option(0.0, "CutMix: paste a box of the rolled batch (0: off; with MixUp: one per batch)")
    random_erase: float = option(
        0.0, "random erasing: chance per image of one box set to the mean (0: off; torchvision 0.1)"
    )
    precision: str = option("bfloat16", "autocast dtype on GPU (float16 adds a GradScaler)", tuple(AUTOCAST_DTYPES))
    accumulate: int = option(1, "micro-batches per optimizer step (global batch on fewer GPUs)")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off)")
    ema_decay: float = option(0.0, "weight EMA decay per optimizer step (0: off)")


@dataclass
class ScheduleConfig:
    kind: str = option("linear", "decay after warmup: cosine, linear (to zero) or step", SCHEDULES)
    warmup: str = option("linear", "linear: ramp from warmup_lr to the peak; constant: hold warmup_lr", WARMUPS)
    warmup_epochs: float = option(2.0, "epochs of warmup")
    warmup_lr: float = option(0.0, "learning rate at step 0 (linear) or during warmup (constant)")
    step_every_epochs: int = option(30, "step schedule: multiply by step_gamma every this many epochs")
    step_gamma: float = option(0.1, "step schedule factor")
    min_lr: float = option(0.0, "cosine and linear decay end at this learning rate (torchvision's --lr-min)")


@dataclass
class TrainConfig:
    epochs: int = option(16, "epochs to train")
    seed: int = option(0, "seed of data order, augmentation and initialisation")
    stop_when: dict[str, float] = option(
        None, "stop early once every listed val metric reaches its target (acc1, acc5, loss)", default_factory=dict
    )


@dataclass
class EvalConfig:
    every: int = option(1, "evaluate every this many epochs (and after the last)")
    batch_size: int = option(256, "images per eval step on each rank")
    flip: bool = option(False, "also score each image mirrored and average the logits (FFCV's lr_tta)")


@dataclass
class LogConfig:
    every: int = option(50, "log every this many optimizer steps (a host sync point)")
    tensorboard: bool = option(True, "write TensorBoard event files")
    histograms: bool = option(False, "weight histograms in TensorBoard at each eval")
    grad_norm: bool = option(
        False,
        "log the gradients' total L2 norm before clipping (train/grad_norm, the window's mean, and "
        "train/grad_norm_max): computed by optim.grad_clip anyway, else one norm per step",
    )
    profile_steps: int = option(
        0,
        "record this many optimizer steps with torch.profiler on every rank, from log.profile_start; each "
        "rank writes a Chrome trace and a table of its slowest operators to run.dir/profile (0: off)",
    )
    profile_start: int = option(20, "the optimizer step (counted from the run's first) profiling starts at")


@dataclass
class CheckpointConfig:
    every_steps: int = option(0, "also save last.pt every this many optimizer steps (0: only per epoch)")
    every_minutes: float = option(
        0.0, "also save last.pt once this many minutes have passed since the last save, at a log step (0: off)"
    )
    keep_every_epochs: int = option(0, "keep last.pt of every this many epochs as epoch-N.pt (0: none kept)")
    keep_best: int = option(
        0,
        "keep the checkpoints of the this many best-scoring evaluated epochs (val acc1; the EMA's with "
        "optim.ema_decay) as best-epoch-N.pt, for tools.average_checkpoints (0: none kept)",
    )


@dataclass
class RunConfig:
    dir: str = option("runs/default", "logs, resolved config and checkpoints go here")
    signal_grace_s: float = option(20.0, "after SIGTERM/SIGINT, force exit if no clean stop within this")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def peak_lr(self, global_batch: int) -> float:
        if self.optim.lr_batch == 0:
            return self.optim.lr
        return self.optim.lr * global_batch / self.optim.lr_batch

    def precision_on(self, device) -> str:
        """The autocast precision actually used: mixed precision is for GPUs; CPUs compute in float32."""
        return self.optim.precision if device.type == "cuda" else "float32"

    @property
    def val_backend(self) -> str:
        return self.data.val_backend or self.data.backend

    def loader_config(self, split: str, device) -> LoaderConfig:
        """Batches arrive in the dtype autocast computes in (float32 without autocast)."""
        return LoaderConfig(
            backend=self.data.backend if split == "train" else self.val_backend,
            batch_size=self.data.batch_size if split == "train" else self.eval.batch_size,
            image_size=self.resolution.min,
            val_image_size=self.resolution.val,
            crop_pct=self.data.crop_pct,
            interpolation=self.data.interpolation,
            workers=self.data.workers,
            dtype=self.precision_on(device),
            hw_decoder_load=self.data.hw_decoder_load,
            prefetch=self.data.prefetch,
            seed=self.train.seed,
            aug_repeats=self.data.aug_repeats,
            auto_augment=self.data.auto_augment,
            rand_augment_ops=self.data.rand_augment_ops,
            rand_augment_magnitude=self.data.rand_augment_magnitude,
            rand_augment_magnitude_std=self.data.rand_augment_magnitude_std,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names it."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (optional), then `section.key=value` overrides; validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = read_text_file(path, "--config")  # UTF-8 whatever the locale; a byte-order mark is fine
        except ValueError as err:
            raise ConfigError(str(err)) from None
        data = _parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        data[section][name] = _parse_yaml(text, f"override {item!r}")
    config = _build(Config, data, "")
    _check(config)
    return config


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err}{place})") from None


def config_changes(before: dict, after: dict) -> list[str]:
    """`section.key: old -> new` for each setting of `after` that differs in `before` (both
    `Config.to_dict()`s; a key an older checkpoint lacks counts as changed)."""
    changes = []
    for section, values in after.items():
        earlier = before.get(section, {})
        for key, value in values.items():
            if key not in earlier or earlier[key] != value:
                changes.append(f"{section}.{key}: {earlier.get(key, '(not set)')} -> {value}")
    return changes


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, in the order of its sections and keys."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_reference(width: int = 100) -> str:
    """Every section and key with its default, type, allowed values and help: the epilog of
    `python -m train --help`, generated here so that it cannot drift from the dataclasses."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        if lines:
            lines.append("")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            hint = hints[f.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint)
            text = f"{section.name}.{f.name}: {json.dumps(default)} ({kind}) {f.metadata['help']}"
            choices = f.metadata.get("choices")
            if choices and len(choices) <= 12:
                text += f"; one of: {', '.join(str(c) for c in choices)}"
            lines.extend(textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", data[name], hint, f.metadata.get("choices"))
    return cls(**values)


def _coerce(key: str, value, hint, choices):
    if isinstance(value, str) and float in typing.get_args(hint) + (hint,):
        # PyYAML reads 1e-4 (no dot) as a string: YAML 1.1's float pattern needs one.
        try:
            value = float(value)
        except ValueError:
            pass
    allowed = [a for a in typing.get_args(hint)] if isinstance(hint, types.UnionType) else [hint]
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            break
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
            break
        if kind is str and isinstance(value, str):
            break
        if typing.get_origin(kind) is dict and isinstance(value, dict):
            value = {str(k): _coerce(f"{key}.{k}", v, float, None) for k, v in value.items()}
            break
    else:
        names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    return value


def _check(config: Config) -> None:
    """Cross-field rules that types alone do not express."""
    for metric in config.train.stop_when:
        if metric not in STOP_METRICS:
            raise ConfigError(f"train.stop_when.{metric}: unknown metric; valid: {list(STOP_METRICS)}")
    positive = {
        "data.batch_size": config.data.batch_size,
        "eval.batch_size": config.eval.batch_size,
        "train.epochs": config.train.epochs,
        "optim.accumulate": config.optim.accumulate,
        "log.every": config.log.every,
        "eval.every": config.eval.every,
        "data.workers": config.data.workers,
        "data.aug_repeats": config.data.aug_repeats,
        "resolution.min": config.resolution.min,
        "resolution.val": config.resolution.val,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for section, values in config.to_dict().items():  # YAML reads .nan and .inf as floats
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{name}: must be a finite number, got {value}")
    for key in (
        "checkpoint.every_steps",
        "checkpoint.every_minutes",
        "checkpoint.keep_every_epochs",
        "checkpoint.keep_best",
        "log.profile_steps",
        "optim.weight_decay",
        "optim.grad_clip",
        "schedule.warmup_epochs",
    ):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value < 0:
            raise ConfigError(f"{key}: must be 0 (off) or more, got {value}")
    for key in ("schedule.step_gamma", "run.signal_grace_s"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value <= 0:
            raise ConfigError(f"{key}: must be more than 0, got {value}")
    if not 0.0 <= config.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum: must be in [0, 1), got {config.optim.momentum}")
    for key, value in {
        "log.profile_start": config.log.profile_start,
        "optim.lr": config.optim.lr,  # 0 leaves the weights as they start (tests do that)
        "optim.lr_batch": config.optim.lr_batch,
        "schedule.warmup_lr": config.schedule.warmup_lr,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if (config.data.backend == "folder") != (config.val_backend == "folder"):  # a folder tree, or shards
        raise ConfigError(
            f"data.val_backend: {config.val_backend!r} cannot read what data.backend {config.data.backend!r} reads"
            " (the folder backend reads an ImageNet folder tree, the others shards)"
        )
    if config.resolution.min > config.resolution.max:
        raise ConfigError("resolution.min: must not exceed resolution.max")
    if config.model.zero_init_residual and config.model.name not in RESNET_FAMILY:
        raise ConfigError(
            f"model.zero_init_residual: {config.model.name} has no such option (the ResNet family only); "
            "leave it unset or false"
        )
    drop_path = config.model.drop_path
    if drop_path is not None and not 0.0 <= drop_path < 1.0:
        raise ConfigError(f"model.drop_path: must be in [0, 1), got {drop_path}")
    sizes = {config.resolution.min, config.resolution.max, config.resolution.val}
    if config.model.name in FIXED_SIZE_KEYWORDS and len(sizes) > 1:
        raise ConfigError(
            f"resolution: {config.model.name} is built for one input size, so resolution.min, resolution.max "
            f"and resolution.val must be equal (got {config.resolution.min}, {config.resolution.max}, "
            f"{config.resolution.val})"
        )
    for key in ("mixup_alpha", "cutmix_alpha"):
        if getattr(config.optim, key) < 0:
            raise ConfigError(f"optim.{key}: must be 0 (off) or more, got {getattr(config.optim, key)}")
    if not 0.0 <= config.optim.random_erase <= 1.0:
        raise ConfigError(f"optim.random_erase: must be a probability in [0, 1], got {config.optim.random_erase}")
    if config.schedule.min_lr < 0:
        raise ConfigError(f"schedule.min_lr: must be 0 or more, got {config.schedule.min_lr}")
    threshold = config.optim.bce_target_threshold
    if threshold is not None and config.optim.loss != "bce":
        raise ConfigError(f"optim.bce_target_threshold: applies to optim.loss bce, not {config.optim.loss}")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ConfigError(f"optim.bce_target_threshold: must be in [0, 1), got {threshold}")
    if not 0.0 <= config.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing: must be in [0, 1), got {config.optim.label_smoothing}")
    if not 0.0 <= config.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay: must be in [0, 1), got {config.optim.ema_decay}")
    # The loaders' own rules (data.hw_decoder_load, data.crop_pct, data.prefetch, the automatic
    # augmentation, ...), here so that a bad value stops the run before it writes anything.
    for split in ("train", "val"):
        try:
            config.loader_config(split, torch.device("cpu")).check()
        except ValueError as err:
            raise ConfigError(str(err)) from None
