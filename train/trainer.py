"""Train an ImageNet classifier: a plain DDP loop over the per-rank shard split.

    python -m train --config configs/demo.yaml                                  # one process
    torchrun --nproc-per-node 8 -m train --config configs/resnet18.yaml data.shards=/data/shards
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m train --config configs/resnet50.yaml data.shards=/shared/imagenet-shards
    python -m train --config configs/resnet18.yaml --resume auto                # continue from last.pt

Reads top to bottom: config, distributed setup, data, model, optimizer, resume, then the loop
(set lr, forward under autocast, backward, step, log at intervals), evaluation and checkpoints
per epoch. Exit status: 0 done (or stopped cleanly by a signal), 2 bad config, a checkpoint that
cannot be resumed or written, or a log that cannot be written, 3 non-finite loss, 4 bad data (named
in the message); any other failure raises.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from pipeline.errors import SampleDecodeError, data_error_message
from pipeline.loader import create_loader
from pipeline.shard_set import ShardError
from shards.classes import imagenet_names
from shards.inputs import list_class_folders
from shards.manifest import manifest_digest, read_manifest
from train.best_kept import keep_epoch, rank_epochs, reconcile_on_resume
from train.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    CheckpointError,
    check_ranks_agree_on_checkpoint,
    check_same_classes,
    check_same_model,
    check_same_optimizer,
    keep_copy,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.config import (
    STOP_METRICS,
    Config,
    ConfigError,
    config_changes,
    config_reference,
    config_yaml,
    load_config,
)
from train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    broadcast_buffers,
    fail_together,
    require_agreement,
    setup_distributed,
    teardown_distributed,
)
from train.ema import update_ema
from train.erasing import random_erasing
from train.lamb import Lamb
from train.loss import build_criterion
from train.metrics import evaluate
from train.mixing import batch_mixer
from train.model import build_model
from train.profiling import StepProfiler
from train.progress import LogWindow, log_epoch_time, log_profile, log_train
from train.resume import resume_point, start_position
from train.run_log import RunLogError, create_run_log, software_facts
from train.schedule import in_warmup, learning_rate, train_image_size
from train.signals import StopRequest
from train.step import backward, compute_loss, optimizer_step, set_cuda_numerics
from train.timing import PhaseTimer, SyncTimer

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_DATA = 0, 2, 3, 4
# torchvision's ViT, Swin and MaxViT parameters that timm's recipes leave undecayed, as norms and biases.
NO_DECAY_NAMES = ("class_token", "pos_embedding", "relative_position_bias_table", "logit_scale")
# Settings that may differ between nodes: where the node holds the shards, and how hard its host works
# to read them (a node with fewer cores may run fewer workers). Which samples a rank reads does not
# depend on them.
PER_NODE_SETTINGS = ("data.shards", "data.workers", "data.prefetch", "data.hw_decoder_load")
# What main() reports in one line: raised on every rank alike when one rank fails during setup.
STARTUP_ERRORS = (ShardError, SampleDecodeError, FileNotFoundError, ConfigError, CheckpointError, RunLogError)


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__.split("\n\n")[0],
        epilog="config keys (section.key: default (type) help), for the YAML file or as overrides:\n"
        + config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML recipe under configs/")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (the file, then the overrides) as YAML and exit without training",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="'auto': continue from run.dir/last.pt if it exists; or a checkpoint path "
        "(a torchrun restart resumes automatically). Without it, a run.dir holding last.pt is refused",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.2 data.backend=dali-cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(config_yaml(cfg), end="")
        return EXIT_OK
    resume = args.resume
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # torchrun --max-restarts brought us back: continue from the last checkpoint
    earlier = Path(cfg.run.dir) / LAST_NAME
    if resume is None and earlier.is_file():
        # Starting afresh would replace its checkpoints within an epoch: a forgotten --resume in a
        # requeued job script must not cost the days of training they hold.
        print(
            f"train: config error: {earlier} holds an earlier run: continue it with --resume auto, or give another "
            "run.dir (or remove that one) to start afresh",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    ctx = setup_distributed()
    stop = StopRequest(cfg.run.signal_grace_s).install()
    try:
        return train(cfg, ctx, resume, stop)
    except NonFiniteLoss as err:
        print(f"train: {err}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except (ShardError, SampleDecodeError, FileNotFoundError) as err:
        print(f"train: data error: {data_error_message(err)}", file=sys.stderr, flush=True)
        return EXIT_DATA
    except ConfigError as err:
        print(f"train: config error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except CheckpointError as err:
        print(f"train: checkpoint error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except RunLogError as err:
        print(f"train: log error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        stop.done()
        teardown_distributed(ctx)


def build_optimizer(model: torch.nn.Module, cfg: Config, peak_lr: float) -> torch.optim.Optimizer:
    """SGD, AdamW, RMSprop or LAMB. With `optim.no_decay_bn_bias`, norm layers' weights and all biases (1-D
    parameters) and the transformers' embeddings (`NO_DECAY_NAMES`) get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if cfg.optim.no_decay_bn_bias and exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr)
    if cfg.optim.optimizer == "lamb":
        return Lamb(groups, lr=peak_lr)
    if cfg.optim.optimizer == "rmsprop":  # torchvision's settings: eps 0.0316 is the root of TensorFlow's 1e-3
        return torch.optim.RMSprop(groups, lr=peak_lr, alpha=0.9, eps=0.0316, momentum=cfg.optim.momentum)
    return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)


def shared_facts(
    cfg: Config, classes: list, num_classes: int, shards_digest: str | None, train_steps: int, val_steps: int
) -> dict[str, object]:
    """What every rank must hold alike, compared across ranks before the first step.

    Each node runs its own copy of the code, reads its own config file and its own copy of the
    shards: an edit on one node, or an older conversion on another, would otherwise train silently
    on a mixture (or hang at a collective if the step counts differ). `PER_NODE_SETTINGS` may
    differ; the shards' manifest digest may not.
    """
    settings = cfg.to_dict()
    facts: dict[str, object] = {
        f"{section}.{key}": value
        for section, values in settings.items()
        for key, value in values.items()
        if f"{section}.{key}" not in PER_NODE_SETTINGS
    }
    if shards_digest is not None:
        facts["data: manifest.json sha256"] = shards_digest
    facts["data: classes"] = (num_classes, hashlib.sha256(repr(classes).encode()).hexdigest()[:16])
    facts["data: train steps per epoch"] = train_steps
    facts["data: val steps"] = val_steps
    return facts | software_facts()


def train(cfg: Config, ctx: DistContext, resume: str | None, stop: StopRequest) -> int:
    run_dir = Path(cfg.run.dir)
    # Setup, each rank on its own: an error on one rank (a node without the shards, a run.dir rank 0
    # cannot lock, a checkpoint one node cannot read) stops every rank at once, none left waiting.
    with fail_together(ctx, STARTUP_ERRORS):
        log = create_run_log(run_dir, cfg, ctx.is_main)
        torch.manual_seed(cfg.train.seed + ctx.rank)
        random.seed(cfg.train.seed + ctx.rank)
        np.random.seed(cfg.train.seed + ctx.rank)
        precision = cfg.precision_on(ctx.device)
        set_cuda_numerics(ctx.device, precision)

        # data: each rank reads only its own part of the shards
        try:
            train_loader = create_loader(
                cfg.data.shards, "train", cfg.loader_config("train", ctx.device), ctx.rank, ctx.world_size, ctx.device
            )
            val_loader = create_loader(
                cfg.data.shards, "val", cfg.loader_config("val", ctx.device), ctx.rank, ctx.world_size, ctx.device
            )
        except ValueError as err:  # a data setting that cannot work here (e.g. dali-gpu without a GPU)
            raise ConfigError(str(err)) from err
        classes = []  # [wnid, name] per class index, kept in checkpoints for tools.predict
        if cfg.data.backend == "folder":
            known = imagenet_names()
            classes = [[w, known.get(w, "")] for w in list_class_folders(Path(cfg.data.shards) / "train")]
        elif cfg.data.shards:
            classes = [[c.wnid, c.name or ""] for c in read_manifest(cfg.data.shards).classes]
        uses_shards = cfg.data.shards and cfg.data.backend not in ("folder", "synthetic")
        shards_digest = manifest_digest(cfg.data.shards) if uses_shards else None
        num_classes = train_loader.num_classes

        # model, optimizer, precision
        try:
            model = build_model(
                cfg.model.name,
                num_classes,
                cfg.model.zero_init_residual,
                cfg.model.blurpool,
                cfg.resolution.val,
                cfg.model.drop_path,
            )
        except ValueError as err:  # e.g. a size torchvision's MaxViT cannot partition
            raise ConfigError(f"model {cfg.model.name}: {err}") from err
        model = model.to(ctx.device)
        checkpoint_path = _resolve_resume(resume, run_dir)
        if checkpoint_path is None and cfg.model.init_from:  # a resumed run has its own weights
            load_weights(model, cfg.model.init_from)
            log.line(f"initial weights from {cfg.model.init_from}")
        accumulate = cfg.optim.accumulate
        global_batch = cfg.data.batch_size * ctx.world_size * accumulate
        peak_lr = cfg.peak_lr(global_batch)
        if cfg.schedule.min_lr > peak_lr:
            raise ConfigError(
                f"schedule.min_lr {cfg.schedule.min_lr:g} exceeds the peak learning rate {peak_lr:g} (optim.lr "
                f"{cfg.optim.lr:g} for {cfg.optim.lr_batch} images, scaled to the global batch of {global_batch})"
            )
        optimizer = build_optimizer(model, cfg, peak_lr)
        scaler = torch.amp.GradScaler("cuda") if precision == "float16" else None
        ema = None
        if cfg.optim.ema_decay:
            # use_buffers: BatchNorm running statistics are averaged too, or the EMA model would keep
            # the statistics it was created with.
            ema = AveragedModel(model, use_buffers=True)  # updated by `update_ema`
        ema_empty = True  # no update yet: the first one copies the weights
        criterion = build_criterion(cfg.optim.loss, cfg.optim.label_smoothing, cfg.optim.bce_target_threshold)
        mix = batch_mixer(num_classes, cfg.optim.mixup_alpha, cfg.optim.cutmix_alpha)
        steps_per_epoch = train_loader.steps_per_epoch // accumulate
        if steps_per_epoch == 0:
            batches = train_loader.steps_per_epoch
            raise ConfigError(f"optim.accumulate={accumulate} exceeds the {batches} batches per epoch")
        last_step = steps_per_epoch * cfg.train.epochs - 1
        if cfg.log.profile_steps and cfg.log.profile_start > last_step:
            raise ConfigError(
                f"log.profile_start: step {cfg.log.profile_start} is past the run's last step, {last_step}"
            )

        # resume
        position = start_position()
        earlier_split = None  # resumed mid-epoch with another data split: how the checkpoint's run split it
        checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
        if checkpoint is not None:
            check_same_model(checkpoint, checkpoint_path, cfg.model.name, cfg.model.blurpool)
            check_same_optimizer(checkpoint, checkpoint_path, cfg.optim.optimizer)
            wnids = [wnid for wnid, _ in classes]
            check_same_classes(checkpoint, checkpoint_path, num_classes, wnids, f"data.shards {cfg.data.shards}")
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            if ema is not None and checkpoint.get("ema"):
                ema.load_state_dict(checkpoint["ema"])
                ema_empty = int(ema.n_averaged) == 0
            resumed = resume_point(checkpoint, cfg, ctx.world_size, steps_per_epoch, shards_digest)
            position, earlier_split = resumed.position, resumed.earlier_split
            if ctx.is_main:
                for note in reconcile_on_resume(run_dir, position["best_kept"], checkpoint_path, checkpoint):
                    log.line(note)
            log.line(f"resumed from {checkpoint_path}: epoch {position['epoch']} step {checkpoint['step_in_epoch']}")
            for note in resumed.notes:
                log.line(note)
            changes = config_changes(checkpoint["config"], cfg.to_dict())
            if changes:
                log.line(f"settings that differ from the checkpoint's: {'; '.join(changes)}")
            if checkpoint["world_size"] == ctx.world_size:
                set_rng_state(checkpoint["rng"][ctx.rank])
            else:
                log.line(
                    f"note: the checkpoint was written by {checkpoint['world_size']} processes, this run has "
                    f"{ctx.world_size}: random streams start afresh, the data split changes and the global batch, "
                    "and with it the lr, is this run's"
                )
        log.start_at(position["global_step"])
        facts = shared_facts(
            cfg, classes, num_classes, shards_digest, train_loader.steps_per_epoch, val_loader.steps_per_epoch
        )
    check_ranks_agree_on_checkpoint(checkpoint_path, checkpoint, ctx)
    require_agreement(facts, ctx, "every node must run the same code, config and overrides, on the same shards")

    train_model: torch.nn.Module = model
    sync_timer = None
    if ctx.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
        sync_timer = SyncTimer(train_model, ctx.device)
    if cfg.model.compile:
        train_model = torch.compile(train_model)

    last_saved = time.monotonic()  # when this process last saved a checkpoint (or started)

    def save(name: str, metrics: dict | None = None) -> None:
        """Every rank contributes its RNG state; rank 0 writes."""
        nonlocal last_saved
        last_saved = time.monotonic()
        rngs = all_gather_objects(rng_state(), ctx)
        if not ctx.is_main:
            return
        payload = {
            "model": model.state_dict(),  # the bare module: no DDP 'module.' or compile prefixes
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "ema": ema.state_dict() if ema is not None else {},
            **position,
            "metrics": metrics or {},
            "config": cfg.to_dict(),
            "classes": classes,
            "num_classes": num_classes,
            "rng": rngs,
            "world_size": ctx.world_size,
            "steps_per_epoch": steps_per_epoch,
            "shards_digest": shards_digest,  # which conversion was read (shards.manifest.manifest_digest)
        }
        save_checkpoint(run_dir / name, payload)

    log.line(
        f"training {cfg.model.name} on {ctx.world_size} process(es), {ctx.device.type}, {precision}; "
        f"global batch {global_batch}, peak lr {peak_lr:.4g}, {steps_per_epoch} steps/epoch, data {cfg.data.backend}"
        + (f" (val {cfg.val_backend})" if cfg.val_backend != cfg.data.backend else "")
    )
    profiler = None
    if cfg.log.profile_steps:
        profiler = StepProfiler(cfg.log.profile_start, cfg.log.profile_steps, run_dir / "profile", ctx.rank, ctx.device)
    timer = PhaseTimer(ctx.device, profiler)
    window = LogWindow(cfg.log.every, ctx, position["global_step"])

    def flush_window(epoch: int, lr: float) -> tuple[bool, bool]:
        """Host sync point: reduce and log the window, stop on a non-finite loss. Returns whether a
        rank was signalled and whether a rank's `checkpoint.every_minutes` has passed (all agree)."""
        minutes = cfg.checkpoint.every_minutes
        checkpoint_due = bool(minutes) and time.monotonic() - last_saved >= 60.0 * minutes
        stats = window.reduce(position["global_step"], stop, timer.data_ms(), checkpoint_due)
        if stats["first_nonfinite_step"] is not None:
            raise NonFiniteLoss(
                f"loss became non-finite at step {stats['first_nonfinite_step']} (epoch {epoch}); stopped "
                f"without saving: the last good checkpoint in {run_dir} is kept"
            )
        sync_ms = sync_timer.summary() if sync_timer is not None else 0.0
        log_train(log, epoch, position, steps_per_epoch, stats, timer.summary(), sync_ms, lr)
        window.reset(position["global_step"])
        return stats["stop"], stats["checkpoint_due"]

    stopped_by_signal = False
    final_metrics: dict = {}
    if position["epoch"] >= cfg.train.epochs:  # e.g. a finished job requeued with --resume auto
        log.line(
            f"nothing left to train: the checkpoint has finished {position['epoch']} epoch(s), train.epochs is "
            f"{cfg.train.epochs} (raise it to train on)"
        )

    image_size = None
    for epoch in range(position["epoch"], cfg.train.epochs):
        if train_image_size(epoch, cfg.resolution) != image_size:
            image_size = train_image_size(epoch, cfg.resolution)
            log.line(f"epoch {epoch}: train images at {image_size} px")
        train_loader.set_image_size(image_size)
        # Resumed mid-epoch, the loader starts at the saved step with the batches an unbroken run read there.
        first_micro = position["step_in_epoch"] * accumulate
        train_loader.set_epoch(epoch, start_step=first_micro, earlier=earlier_split)
        if earlier_split is not None:
            log.line(
                f"epoch {epoch} goes on with the samples the checkpoint's run had not read (it split the epoch "
                f"over {earlier_split.world_size} process(es) in batches of {earlier_split.batch_size} and had "
                f"read {earlier_split.batches_read} each)"
            )
            earlier_split = None
        epoch_started, steps_to_train = time.perf_counter(), steps_per_epoch - position["step_in_epoch"]
        model.train()
        bar = tqdm(
            total=steps_per_epoch,
            initial=position["step_in_epoch"],
            desc=f"epoch {epoch}",
            disable=not (ctx.is_main and sys.stdout.isatty()),
            leave=False,
        )
        batches = iter(train_loader)
        for micro in range(first_micro, steps_per_epoch * accumulate):
            if profiler is not None and micro % accumulate == 0:
                profiler.before_step(position["global_step"])
            with timer.data_wait():
                images, labels = next(batches)
            if cfg.optim.random_erase > 0:
                images = random_erasing(images, cfg.optim.random_erase)
            if mix is not None:
                images, labels = mix(images, labels)  # labels become class probabilities

            last_micro = (micro + 1) % accumulate == 0
            no_sync = train_model.no_sync() if ctx.distributed and not last_micro else contextlib.nullcontext()
            with no_sync:
                with timer.phase("forward"):
                    loss = compute_loss(train_model, criterion, images, labels, precision)
                with timer.phase("backward"):
                    backward(loss, scaler, accumulate)  # under DDP the gradient all-reduce overlaps this
            if micro % accumulate == 0:
                step_loss = 0.0  # mean over the micro-batches of this optimizer step
            step_loss = step_loss + loss.detach() / accumulate
            if not last_micro:
                continue

            # The schedule follows the position in the epochs, not global_step (the steps taken), which
            # differs from it after a resume with another number of steps per epoch.
            schedule_step = epoch * steps_per_epoch + position["step_in_epoch"]
            lr = learning_rate(schedule_step, steps_per_epoch, cfg.train.epochs, peak_lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with timer.phase("optimizer"):
                grad_norm = optimizer_step(
                    optimizer, model.parameters(), scaler, cfg.optim.grad_clip, cfg.log.grad_norm
                )
                if ema is not None:
                    # The EMA starts when the warmup ends (until then each update copies the
                    # weights), as torchvision's reference script restarts it during warmup.
                    warmup = in_warmup(schedule_step, steps_per_epoch, cfg.train.epochs, cfg.schedule)
                    update_ema(ema, model, cfg.optim.ema_decay, copy=ema_empty or warmup)
                    ema_empty = False
            timer.step_done()
            if profiler is not None:
                log_profile(log, profiler.after_step(position["global_step"]), ctx.world_size)
            if sync_timer is not None:
                sync_timer.step_done()
            window.record(
                position["global_step"],
                step_loss,
                len(images) * accumulate * ctx.world_size,
                grad_norm if cfg.log.grad_norm else None,
            )
            position["global_step"] += 1
            position["step_in_epoch"] += 1
            bar.update(1)

            at_log = window.steps(position["global_step"]) == cfg.log.every
            at_checkpoint = cfg.checkpoint.every_steps and position["global_step"] % cfg.checkpoint.every_steps == 0
            if at_log or at_checkpoint:
                stop_now, checkpoint_due = flush_window(epoch, lr)
                if at_checkpoint or checkpoint_due or stop_now:
                    save(LAST_NAME)
                    if not stop_now:
                        log.line(f"saved {run_dir / LAST_NAME} at epoch {epoch} step {position['step_in_epoch']}")
                if stop_now:
                    stopped_by_signal = True
                    break
        bar.close()
        if stopped_by_signal:
            log.line(
                f"stopped by {stop.signal_name or 'a signal on another rank'} at epoch {epoch} step "
                f"{position['step_in_epoch']}; saved {run_dir / LAST_NAME}; resume with --resume auto"
            )
            break

        # end of epoch: flush the partial log window, evaluate, checkpoint, check the stop criteria
        if window.steps(position["global_step"]):
            flush_window(epoch, lr)
        position["epoch"], position["step_in_epoch"] = epoch + 1, 0
        last_epoch = epoch + 1 == cfg.train.epochs
        metrics = {}
        if (epoch + 1) % cfg.eval.every == 0 or last_epoch:
            broadcast_buffers(model, ctx)  # evaluate the model rank 0 checkpoints, on every rank
            metrics = evaluate(model, val_loader, ctx, precision, cfg.eval.flip)
            if ema is not None:
                broadcast_buffers(ema, ctx)
                ema_metrics = evaluate(ema.module, val_loader, ctx, precision, cfg.eval.flip)
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "samples"})
            log.scalars(position["global_step"], {f"val/{k}": v for k, v in metrics.items()} | {"epoch": epoch})
            log.histograms(position["global_step"], model)
            log.line(
                f"epoch {epoch} val: acc1 {metrics['acc1']:.2f} acc5 {metrics['acc5']:.2f} "
                f"loss {metrics['loss']:.4f} ({metrics['samples']} images at {cfg.resolution.val} px"
                + (", each also mirrored)" if cfg.eval.flip else ")")
                + (f"; EMA acc1 {metrics['ema_acc1']:.2f} acc5 {metrics['ema_acc5']:.2f}" if ema is not None else "")
            )
            final_metrics = metrics
        # With an EMA, best.pt is the epoch whose EMA scored best (the weights such a run is used
        # with), as timm chooses it.
        best_by = "ema_acc1" if ema is not None else "acc1"
        improved = bool(metrics) and metrics[best_by] > position["best_acc1"]
        if improved:
            position["best_acc1"] = metrics[best_by]
        dropped = []
        if metrics and cfg.checkpoint.keep_best:
            position["best_kept"], dropped = rank_epochs(
                position["best_kept"], epoch + 1, metrics[best_by], cfg.checkpoint.keep_best
            )
        save(LAST_NAME, metrics)
        if improved:
            save(BEST_NAME, metrics)
        if ctx.is_main and metrics and cfg.checkpoint.keep_best:
            keep_epoch(run_dir, run_dir / LAST_NAME, epoch + 1, position["best_kept"], dropped)
        keep_every = cfg.checkpoint.keep_every_epochs
        if ctx.is_main and keep_every and (epoch + 1) % keep_every == 0:
            keep_copy(run_dir / LAST_NAME, run_dir / f"epoch-{epoch + 1}.pt")
        log_epoch_time(
            log, epoch, time.perf_counter() - epoch_started, steps_to_train, steps_per_epoch, cfg.train.epochs
        )
        if metrics and _targets_met(metrics, cfg.train.stop_when):
            log.line(f"stop criteria {cfg.train.stop_when} met after epoch {epoch}")
            break
        if _stop_requested(stop, ctx):
            stopped_by_signal = True
            log.line(
                f"stopped by {stop.signal_name or 'a signal on another rank'} after epoch {epoch}; "
                f"saved {run_dir / LAST_NAME}; resume with --resume auto"
            )
            break

    if profiler is not None:
        log_profile(log, profiler.finish(position["global_step"]), ctx.world_size)  # a run that ended inside the window
    train_loader.close()
    val_loader.close()
    if final_metrics and not stopped_by_signal:
        ema_text = f" (EMA acc1 {final_metrics['ema_acc1']:.2f})" if "ema_acc1" in final_metrics else ""
        log.line(f"done: acc1 {final_metrics['acc1']:.2f} acc5 {final_metrics['acc5']:.2f}{ema_text}; run in {run_dir}")
    log.close()
    return EXIT_OK


def _stop_requested(stop: StopRequest, ctx: DistContext) -> bool:
    flag = torch.tensor([float(stop.requested)], device=ctx.device)
    return all_reduce_sum(flag, ctx).item() > 0


def _targets_met(metrics: dict, targets: dict[str, float]) -> bool:
    """Every listed metric reached its target in its own direction (accuracy up, loss down)."""
    if not targets:
        return False
    for name, target in targets.items():
        better = STOP_METRICS[name]
        value = metrics[name]
        if (better == "max" and value < target) or (better == "min" and value > target):
            return False
    return True


def _resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        path = run_dir / LAST_NAME
        return path if path.is_file() else None
    return Path(resume)
