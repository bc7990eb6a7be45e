"""Pretrain an H-JEPA model on a .beton written by write_datasets/.

    python hjepa/train.py --config-file rn_configs/a100_100ep.yaml [--data.train_dataset=PATH ...]
    python -m hjepa.train --config-file rn_configs/h100_100ep.yaml --print-config   # the merged config
    torchrun --nproc_per_node=8 hjepa/train.py --config-file rn_configs/a100_100ep.yaml --hardware.distributed=1

Writes a run folder <logging.folder>/<time>-<id> (or <logging.run_name>) with params.json,
metrics.jsonl, checkpoint.pt (always the latest) and PNG plots.
"""
import functools
import math
import os
import signal
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from hjepa import checkpoint as ckpt_io
from hjepa.config import config_as_dict, config_from_cli, format_config, save_config
from hjepa.loaders import build_eval_loader, build_train_loader, normalize_images
from hjepa.engine import CUDA_GRAPH_MODES, autocast_dtype, build_optimizer, compile_forward, masks_to_device, train_step
from hjepa.errors import UserError, exit_on_user_error
from hjepa.flops import mfu, train_flops_per_image
from hjepa.masks import MaskConfig, sample_masks
from hjepa.model import build_model
from hjepa.plots import draw_run
from hjepa.probe import knn_monitor
from hjepa.parallel import (all_gather_tensor, all_reduce_sum, broadcast_object, cleanup_distributed,
                            init_distributed, parameter_checksum)
from hjepa.runlog import MetricsLog, ThroughputMeter, git_commit, make_run_dir, new_run_name
from hjepa.schedules import schedule_values
from hjepa.sections import data_config, mask_config, model_config, optim_config
from hjepa.sampler import expected_counts_table


TRAIN_SECTIONS = ("data", "model", "masking", "optim", "training", "hardware", "logging")


def build_loader(cfg, info):
    return build_train_loader(data_config(cfg), distributed=info.enabled, drop_last=True)


def build_monitor_loaders(cfg, train_loader, build=True):
    """(bank, query) eval loaders for the periodic k-NN monitor, or None when logging.eval_every is 0.

    The bank is the training beton through the eval pipeline; a mixture's members have their own
    label spaces, so a multi-dataset beton cannot be the bank."""
    if not cfg["logging.eval_every"]:
        return None
    if not cfg["data.val_dataset"]:
        raise UserError("logging.eval_every needs data.val_dataset (the k-NN monitor's queries)")
    if train_loader.has_dataset_idx:
        raise UserError("the k-NN monitor needs a single-dataset data.train_dataset, not a mixture; "
                        "set logging.eval_every=0 and run eval/linear_probe.py on the member betons")
    if not build:  # only rank 0 runs the monitor; the others just checked the config with it
        return None
    common = dict(batch_size=cfg["data.batch_size"], num_workers=cfg["data.num_workers"],
                  image_size=cfg["data.image_size"], in_memory=cfg["data.in_memory"])
    return (build_eval_loader(cfg["data.train_dataset"], **common),
            build_eval_loader(cfg["data.val_dataset"], **common))


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv, reads=TRAIN_SECTIONS)
    info, device = init_distributed(cfg["hardware.distributed"], cfg["hardware.device"])
    try:
        return run(cfg, info, device)
    finally:
        cleanup_distributed(info)


def run(cfg, info, device):
    """Set up, then train epoch by epoch; returns the run folder. A signal saves and returns early."""
    set_up_torch(cfg, info, device)
    say = print if info.is_main else (lambda *a, **k: None)
    loop, checkpointer, monitor_loaders = build_training(cfg, info, device, say)
    try:
        with loop.stop:  # from here on SIGINT/SIGTERM only ask the loop to stop at a step boundary
            for epoch in range(loop.step // len(loop.loader), cfg["training.epochs"]):
                if loop.step >= loop.stop_step:
                    break
                loop.train_one_epoch(epoch)
                if loop.stop.signal is not None:
                    break
                end_of_epoch(loop, checkpointer, monitor_loaders, epoch)
            step = loop.step
            loop.check_finite(step)
            checkpointer.save(step, step // len(loop.loader))
            if loop.stop.signal is not None:
                say(f"stopped by signal {loop.stop.signal} at step {step}; resume with "
                    f"--training.resume={os.path.join(loop.run_dir, 'checkpoint.pt')}")
                return loop.run_dir
            if info.enabled:
                log_parameter_checksums(loop.log, loop.model, step, info, device)
            if info.is_main and cfg["logging.plots"]:
                loop.log.close()
                say("pictures: " + ", ".join(draw_run(loop.run_dir)))
            say(f"done: {step} steps; checkpoint {os.path.join(loop.run_dir, 'checkpoint.pt')}")
    finally:
        for loader in (loop.loader, *(monitor_loaders or ())):
            loader.close()
        if loop.log:
            loop.log.close()
    return loop.run_dir


def build_training(cfg, info, device, say):
    """Loader, model, optimiser (restored when resuming) and run folder -> (EpochLoop, Checkpointer,
    k-NN monitor loaders or None). Data comes first, so a bad path or mixture fails before any model
    is built; the run folder comes last, so a failed start leaves none."""
    if not cfg["data.train_dataset"]:
        raise UserError("data.train_dataset is empty: pass --data.train_dataset=PATH.beton (see write_datasets/)")
    run_dir = resolve_run_dir(cfg, info)
    say(f"run folder: {run_dir}")
    say(format_config(cfg, TRAIN_SECTIONS))

    loader = build_loader(cfg, info)
    steps_per_epoch, epochs = len(loader), cfg["training.epochs"]
    total_steps = steps_per_epoch * epochs  # the schedules span this, whatever max_steps says
    stop_step = min(total_steps, cfg["training.max_steps"]) if cfg["training.max_steps"] > 0 else total_steps
    global_batch = cfg["data.batch_size"] * info.world_size
    say(f"effective batch {global_batch} = {cfg['data.batch_size']} per process x {info.world_size} processes; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps" + (f", stopping at {stop_step}" if stop_step < total_steps else ""))
    counts_table = expected_counts_table(loader)
    if counts_table:
        say("expected samples per member per epoch:\n" + counts_table)
    monitor_loaders = build_monitor_loaders(cfg, loader, build=info.is_main)

    model = build_model(model_config(cfg)).to(device)
    optim = optim_config(cfg)
    optimizer = build_optimizer(model, lr=optim.peak_lr(global_batch), weight_decay=optim.weight_decay,
                                betas=(optim.beta1, optim.beta2))
    path = resume_path(cfg, run_dir)
    start_step = restore_checkpoint(path, model, optimizer, steps_per_epoch) if path else 0
    if path:
        say(f"resumed from {path} at step {start_step}")

    if info.is_main:
        prepare_run_dir(cfg, run_dir, start_step)
    masking = mask_config(cfg)
    loop = EpochLoop(
        cfg=cfg, info=info, device=device, model=model, forward=wrap_for_training(model, cfg, info, device),
        optimizer=optimizer, loader=loader, run_dir=run_dir, masking=masking, step=start_step,
        stop_step=stop_step, global_batch=global_batch, amp_dtype=autocast_dtype(device, cfg["hardware.bf16"]),
        log=MetricsLog(os.path.join(run_dir, "metrics.jsonl")) if info.is_main else None,
        schedule_at=functools.partial(schedule_values, optim=optim, total_steps=total_steps, global_batch=global_batch,
                                      warmup_steps=round(optim.warmup_epochs * steps_per_epoch)),
        flops_per_image=train_flops_per_image(model.model_config, masking=masking,
                                              num_patches=model.grid_size[0] * model.grid_size[1]))
    checkpointer = ckpt_io.Checkpointer(
        run_dir, functools.partial(training_state, model, optimizer, cfg, steps_per_epoch=steps_per_epoch),
        steps_per_epoch=steps_per_epoch, every_epochs=cfg["training.checkpoint_every"],
        keep=cfg["training.keep_checkpoints"], enabled=info.is_main, saved_step=start_step if path else None)
    return loop, checkpointer, monitor_loaders


def resolve_run_dir(cfg, info):
    resume = cfg["training.resume"]
    if resume and resume != "auto":
        run_dir = os.path.dirname(os.path.abspath(resume))
    else:
        name = cfg["logging.run_name"] or broadcast_object(new_run_name() if info.is_main else None, info)
        if resume == "auto" and not cfg["logging.run_name"]:
            raise UserError("training.resume=auto needs logging.run_name, so the run folder is known")
        run_dir = os.path.join(cfg["logging.folder"], name)
    return run_dir  # made only once data, model and checkpoint have loaded: a failed start leaves no folder


def resume_path(cfg, run_dir):
    resume = cfg["training.resume"]
    if resume == "auto":
        path = os.path.join(run_dir, "checkpoint.pt")
        return path if os.path.isfile(path) else None
    return resume or None


def restore_checkpoint(path, model, optimizer, steps_per_epoch):
    """Load model parts, optimiser and RNG from `path`; return the step to continue from."""
    state = ckpt_io.load_checkpoint(path)
    diff = ckpt_io.architecture_differences(model.model_config, state["model_config"])
    if diff:
        raise UserError(f"{path} is a checkpoint of another architecture: " + "; ".join(diff))
    saved_steps_per_epoch = state["sampler"]["steps_per_epoch"]
    if saved_steps_per_epoch != steps_per_epoch:  # the step -> (epoch, batch) map would shift
        raise UserError(f"{path} was written with {saved_steps_per_epoch} steps per epoch, this run has "
                        f"{steps_per_epoch}: resume with the same data.batch_size, data.epoch_samples and "
                        "number of processes")
    for part in ckpt_io.MODEL_PARTS:
        module = getattr(model, part, None)
        if module is not None:
            ckpt_io.load_state_strict(module, state[part], part, path)
    optimizer.load_state_dict(state["optimizer"])
    ckpt_io.restore_rng_state(state["rng"])
    return state["step"]


def set_up_torch(cfg, info, device):
    # Importing ffcv sets torch's threads to 1 (its Compiler couples them to numba's): set them here.
    torch.set_num_threads(cfg["hardware.num_threads"] or os.cpu_count() or 1)
    if cfg["training.deterministic"]:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":  # TF32 for whatever autocast leaves in fp32 (the EMA, the loss, the optimizer)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["training.seed"] + info.rank)


def wrap_for_training(model, cfg, info, device):
    """What runs the forward: the model, its DDP wrapper, compiled when hardware.compile is set."""
    if info.enabled and cfg["hardware.compile"] and cfg["hardware.compile_mode"] in CUDA_GRAPH_MODES:
        # Untested here: DDP's bucketed all-reduces inside recorded CUDA graphs. Refuse rather than risk a
        # hang or silently wrong gradients on a multi-GPU run.
        raise UserError(f"hardware.compile_mode={cfg['hardware.compile_mode']} (CUDA graphs) is measured on one GPU "
                        "only; with hardware.distributed=1 use default or max-autotune-no-cudagraphs")
    forward = model
    if info.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["hardware.compile"]:
        forward = compile_forward(forward, cfg["hardware.compile_mode"])
    return forward


def prepare_run_dir(cfg, run_dir, start_step):
    """The run folder, its params.json, and one more line in git_commit.txt: `<commit> from step N`
    per start, so a resumed run still names the code that trained its first steps."""
    make_run_dir(*os.path.split(run_dir))
    ckpt_io.remove_partial_checkpoints(run_dir)
    save_config(cfg, os.path.join(run_dir, "params.json"))
    with open(os.path.join(run_dir, "git_commit.txt"), "a") as f:
        f.write(f"{git_commit()} from step {start_step}\n")


class StopSignal:
    """SIGINT/SIGTERM handlers (installed inside `with`) that only record the signal; the loop stops at
    a step boundary. Under DDP ranks agree at log steps (an all-reduce), so a signal that reaches ranks
    at different steps never leaves one rank waiting in the next all-reduce."""

    def __init__(self, info, device):
        self.info, self.device = info, device
        self.signal = None
        self._old_handlers = {}

    def __enter__(self):
        self._old_handlers = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)

    def _record(self, signum, _frame):
        self.signal = signum

    def agreed(self, step, log_every):
        """Whether to stop now (every rank gets the same answer)."""
        if not self.info.enabled:
            return self.signal is not None
        if step % log_every:
            return False
        flag = torch.tensor([0.0 if self.signal is None else 1.0], device=self.device)
        if all_reduce_sum(flag, self.info).item() > 0:
            self.signal = self.signal or "a peer rank's signal"
            return True
        return False


@dataclass
class EpochLoop:
    """What every training step needs, and the loop over one epoch's batches."""
    cfg: dict
    info: object
    device: torch.device
    model: torch.nn.Module
    forward: object
    optimizer: torch.optim.Optimizer
    loader: object
    log: object
    run_dir: str
    masking: MaskConfig
    step: int  # the global step: batches trained so far, over all epochs
    stop_step: int
    global_batch: int
    amp_dtype: object
    schedule_at: object
    flops_per_image: float
    member_counts: torch.Tensor = None  # samples per member seen this epoch (dataset_idx bincount)
    epoch_start_batch: int = 0          # > 0 when this process resumed the epoch mid-way
    stop: StopSignal = None
    nonfinite: torch.Tensor = None

    def __post_init__(self):
        self.stop = StopSignal(self.info, self.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # read only at log steps

    def train_one_epoch(self, epoch):
        """Train from self.step to the end of `epoch`, or to the stop step, or until a stop signal."""
        cfg, steps_per_epoch, step = self.cfg, len(self.loader), self.step
        skip = self.epoch_start_batch = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        self.member_counts = None
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}", unit="step",
                   disable=not (self.info.is_main and cfg["logging.progress"]), dynamic_ncols=True)
        meter = ThroughputMeter(self.global_batch)
        for images, labels, dataset_idx in self.loader.epoch(epoch, start_batch=skip):
            meter.received()
            counts = torch.bincount(dataset_idx, minlength=1)
            self.member_counts = counts if self.member_counts is None else _add_counts(self.member_counts, counts)
            masks = sample_masks(self.masking, batch_size=images.shape[0], grid_size=self.model.grid_size,
                                 seed=cfg["training.seed"], step=step, rank=self.info.rank)
            if step == 0 and self.info.is_main:
                save_mask_examples(self.run_dir, images, masks, self.model.grid_size)
            x = normalize_images(images, self.device, self.amp_dtype or torch.float32)  # (B, 3, H, W)
            out = train_step(self.model, self.forward, self.optimizer, x, masks_to_device(masks, self.device),
                             **self.schedule_at(step), amp_dtype=self.amp_dtype, clip_grad=cfg["optim.clip_grad"])
            self.nonfinite |= ~torch.isfinite(out["loss"].detach())
            step = self.step = step + 1
            meter.step_done()
            bar.update(1)
            if step % cfg["logging.log_every"] == 0 or step == self.stop_step:
                self.log_step(out, step, epoch, meter, bar)
            if self.stop.agreed(step, cfg["logging.log_every"]) or step >= self.stop_step:
                break
            meter.asking()
        bar.close()

    def log_step(self, out, step, epoch, meter, bar):
        self.check_finite(step)  # a device sync point, like reading the loss below
        images_per_s, data_wait = meter.read_and_reset()
        record = _metrics_record(out, step, epoch, self.schedule_at(step - 1), images_per_s=images_per_s,
                                 data_wait=data_wait, flops_per_image=self.flops_per_image,
                                 peak_tflops=self.cfg["hardware.peak_tflops"], num_devices=self.info.world_size)
        if self.log:
            self.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")

    def check_finite(self, step):
        if bool(self.nonfinite):
            raise UserError(f"loss became NaN/Inf by step {step}; stopped, the last good checkpoint stays in {self.run_dir}")


def end_of_epoch(loop, checkpointer, monitor_loaders, epoch):
    """After an epoch's batches: member counts and rank overlap (whole epochs only), the k-NN monitor,
    and the epoch checkpoint. Nothing here runs when the epoch stopped early (max_steps)."""
    step, log, info = loop.step, loop.log, loop.info
    if step % len(loop.loader):
        return
    if loop.epoch_start_batch == 0 and loop.member_counts is not None:  # the whole epoch ran in this process
        member_counts = all_reduce_sum(loop.member_counts.to(loop.device), info).cpu()
        if log:
            record = {"epoch": epoch, "step": step, "member_counts": member_counts.tolist()}
            if loop.loader.members:
                record["member_names"] = [name for name, _ in loop.loader.members]
                record["expected_counts"] = [int(c) for c in loop.loader.epoch_counts]
            log.write(record)
        if info.enabled:
            log_rank_overlap(log, loop.loader, epoch, info, loop.device)
    if monitor_loaders and (epoch + 1) % loop.cfg["logging.eval_every"] == 0:
        knn = knn_monitor(loop.model.target_encoder, *monitor_loaders, device=loop.device,
                          dtype=loop.amp_dtype or torch.float32)
        log.write({"epoch": epoch, "step": step, "knn_top1": knn})
        print(f"epoch {epoch}: k-NN top-1 {knn:.2f}% (target encoder)")
    if checkpointer.due(epoch, loop.cfg["training.epochs"]):
        loop.check_finite(step)
        checkpointer.save(step, epoch + 1)


def log_parameter_checksums(log, model, step, info, device):
    """DDP keeps ranks in lockstep; a mismatch here means a bug, so log it loudly."""
    sums = [float(x) for x in all_gather_tensor(parameter_checksum(model).to(device), info)]
    if log:
        log.write({"step": step, "param_checksums": sums})
    if len(set(sums)) > 1:
        print(f"warning: parameters differ across ranks: {sums}", file=sys.stderr)


def training_state(model, optimizer, cfg, *, step, epoch, steps_per_epoch):
    """Everything a checkpoint holds (hjepa.checkpoint documents the format)."""
    state = {"model_config": model.model_config, "optimizer": optimizer.state_dict(), "step": step,
             "epoch": epoch, "config": config_as_dict(cfg), "rng": ckpt_io.rng_state(),
             "sampler": {"seed": cfg["data.seed"], "order": cfg["data.order"],
                         "steps_per_epoch": steps_per_epoch, "batches_done": step % steps_per_epoch}}
    for part in ckpt_io.MODEL_PARTS:
        module = getattr(model, part, None)
        state[part] = module.state_dict() if module is not None else {}
    return state


def save_mask_examples(run_dir, images, masks, grid, count=8):
    """A few first-step images with their masks, for the masks.png picture (hjepa.plots)."""
    n = min(count, images.shape[0])
    torch.save({"images": images[:n].clone().contiguous(), "ctx_idx": masks.ctx_idx[:n].clone(),
                "tgt_idx": masks.tgt_idx[:, :n].clone(), "grid_size": list(grid)},
               os.path.join(run_dir, "mask_examples.pt"))


def log_rank_overlap(log, loader, epoch, info, device):
    """How many samples of this epoch went to more than one rank (0 for a correct sharding)."""
    mine = torch.as_tensor(loader.epoch_indices(epoch), dtype=torch.int64)
    everyone = torch.stack(all_gather_tensor(mine.to(device), info)).cpu()  # (world, samples per rank)
    overlap = everyone.numel() - torch.unique(everyone).numel()
    if log:
        log.write({"epoch": epoch, "rank_overlap": overlap, "rank_sample_counts": [everyone.shape[1]] * info.world_size})


def _add_counts(a, b):
    n = max(len(a), len(b))
    return torch.nn.functional.pad(a, (0, n - len(a))) + torch.nn.functional.pad(b, (0, n - len(b)))


def _metrics_record(out, step, epoch, schedule, *, images_per_s, data_wait, flops_per_image, peak_tflops,
                    num_devices=1):
    """One metrics.jsonl line; `schedule` is what the step that produced `out` ran with. images_per_s
    counts all processes; mfu is per device (each process drives one)."""
    return {"step": step, "epoch": epoch, "lr": schedule["lr"], "wd": schedule["weight_decay"],
            "momentum": schedule["momentum"], "loss": float(out["loss"].detach()),
            "level_losses": [float(x) for x in out["level_losses"]],
            "target_std": float(out["target_std"]), "pred_std": float(out["pred_std"]),
            "grad_norm": float(out["grad_norm"]), "images_per_s": images_per_s,
            "data_wait_fraction": min(1.0, data_wait),
            "mfu": mfu(images_per_s, flops_per_image, peak_tflops, num_devices) if peak_tflops > 0 else math.nan}


if __name__ == "__main__":
    main()
