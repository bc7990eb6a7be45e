"""Pretrain an H-JEPA model on a .beton written by write_datasets/.

    python hjepa/train.py --config-file rn_configs/a100_100ep.yaml [--data.train_dataset=PATH ...]
    torchrun --nproc_per_node=8 hjepa/train.py --config-file rn_configs/a100_100ep.yaml --hardware.distributed=1

Writes a run folder <logging.folder>/<time>-<id> (or <logging.run_name>) with params.json,
metrics.jsonl, checkpoint.pt (always the latest) and PNG plots.
"""
import functools
import math
import os
import signal
import sys
import time

if __package__ in (None, ""):  # run by path: `python hjepa/train.py` puts hjepa/ itself on sys.path
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
from tqdm import tqdm

from hjepa import checkpoint as ckpt_io
from hjepa import schedules
from hjepa.config import config_as_dict, config_from_cli, format_config, save_config
from hjepa.data import build_eval_loader, build_train_loader, normalize_images
from hjepa.engine import autocast_dtype, build_optimizer, masks_to_device, train_step
from hjepa.errors import UserError, exit_on_user_error
from hjepa.flops import mfu, train_flops_per_image
from hjepa.masks import sample_masks
from hjepa.model import build_model
from hjepa.plots import draw_run
from hjepa.probe import knn_monitor
from hjepa.parallel import (all_gather_tensor, all_reduce_sum, broadcast_object, cleanup_distributed,
                            init_distributed, parameter_checksum)
from hjepa.runlog import MetricsLog, git_commit, make_run_dir, new_run_name
from hjepa.sampler import expected_counts_table


TRAIN_SECTIONS = ("data", "model", "masking", "optim", "training", "hardware", "logging")


def model_kwargs(cfg):
    m = "model."
    return dict(arch=cfg[m + "arch"], patch_size=cfg[m + "patch_size"], image_size=cfg["data.image_size"],
                predictor_embed_dim=cfg[m + "predictor_embed_dim"], predictor_depth=cfg[m + "predictor_depth"],
                predictor_num_heads=cfg[m + "predictor_num_heads"], num_levels=cfg[m + "num_levels"],
                level_weights=cfg[m + "level_weights"], level_depths=cfg[m + "level_depths"],
                loss=cfg[m + "loss"], drop_path=cfg[m + "drop_path"], normalize_levels=cfg[m + "normalize_levels"])


def mask_kwargs(cfg):
    k = "masking."
    return dict(num_targets=cfg[k + "num_targets"],
                target_scale=(cfg[k + "target_scale_min"], cfg[k + "target_scale_max"]),
                target_aspect=(cfg[k + "target_aspect_min"], cfg[k + "target_aspect_max"]),
                context_scale=(cfg[k + "context_scale_min"], cfg[k + "context_scale_max"]),
                context_aspect=cfg[k + "context_aspect"], allow_overlap=cfg[k + "allow_overlap"],
                min_keep=cfg[k + "min_keep"])


def build_loader(cfg, info):
    return build_train_loader(
        cfg["data.train_dataset"], batch_size=cfg["data.batch_size"], num_workers=cfg["data.num_workers"],
        image_size=cfg["data.image_size"], crop_scale=(cfg["data.crop_scale_min"], cfg["data.crop_scale_max"]),
        flip=cfg["data.flip"], color_jitter=cfg["data.color_jitter"], in_memory=cfg["data.in_memory"],
        order=cfg["data.order"], seed=cfg["data.seed"], mixture=cfg["data.mixture"] or None,
        epoch_samples=cfg["data.epoch_samples"], distributed=info.enabled, drop_last=True)


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


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived: save a checkpoint at the current step and exit cleanly."""


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


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv)
    info, device = init_distributed(cfg["hardware.distributed"], cfg["hardware.device"])
    try:
        return run(cfg, info, device)
    finally:
        cleanup_distributed(info)


def run(cfg, info, device):
    # Importing ffcv sets torch's threads to 1 (its Compiler couples them to numba's): set them here.
    torch.set_num_threads(cfg["hardware.num_threads"] or os.cpu_count() or 1)
    if cfg["training.deterministic"]:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":  # TF32 for whatever autocast leaves in fp32 (the EMA, the loss, the optimizer)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["training.seed"] + info.rank)
    if not cfg["data.train_dataset"]:
        raise UserError("data.train_dataset is empty: pass --data.train_dataset=PATH.beton (see write_datasets/)")

    run_dir = resolve_run_dir(cfg, info)
    say = print if info.is_main else (lambda *a, **k: None)
    say(f"run folder: {run_dir}")
    say(format_config(cfg, TRAIN_SECTIONS))

    # Data first: a bad path or mixture fails before any model is built.
    loader = build_loader(cfg, info)
    steps_per_epoch = len(loader)
    epochs, batch = cfg["training.epochs"], cfg["data.batch_size"]
    total_steps = steps_per_epoch * epochs  # the schedules span this, whatever max_steps says
    stop_step = min(total_steps, cfg["training.max_steps"]) if cfg["training.max_steps"] > 0 else total_steps
    global_batch = batch * info.world_size
    say(f"effective batch {global_batch} = {batch} per process x {info.world_size} processes; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps" + (f", stopping at {stop_step}" if stop_step < total_steps else ""))
    counts_table = expected_counts_table(loader)
    if counts_table:
        say("expected samples per member per epoch:\n" + counts_table)

    monitor_loaders = build_monitor_loaders(cfg, loader, build=info.is_main)

    model = build_model(**model_kwargs(cfg)).to(device)
    grid = model.grid_size
    peak_lr = cfg["optim.lr"] * global_batch / 256  # lr is given per 256 images
    optimizer = build_optimizer(model, lr=peak_lr, weight_decay=cfg["optim.weight_decay"],
                                betas=(cfg["optim.beta1"], cfg["optim.beta2"]))

    path = resume_path(cfg, run_dir)
    start_step = restore_checkpoint(path, model, optimizer, steps_per_epoch) if path else 0
    if path:
        say(f"resumed from {path} at step {start_step}")

    forward = model
    if info.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["hardware.compile"]:
        forward = torch.compile(forward)

    if info.is_main:
        make_run_dir(*os.path.split(run_dir))
        ckpt_io.remove_partial_checkpoints(run_dir)
        save_config(cfg, os.path.join(run_dir, "params.json"))
        with open(os.path.join(run_dir, "git_commit.txt"), "w") as f:
            f.write(git_commit() + "\n")
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl")) if info.is_main else None

    schedule_at = functools.partial(schedule_values, cfg=cfg, peak_lr=peak_lr, total_steps=total_steps,
                                    warmup_steps=round(cfg["optim.warmup_epochs"] * steps_per_epoch))
    amp_dtype = autocast_dtype(device, cfg["hardware.bf16"])
    masking = mask_kwargs(cfg)
    tokens = grid[0] * grid[1]
    flops_per_image = train_flops_per_image(model.model_config, masking=masking, num_patches=tokens)

    last_saved = {"step": start_step if path else None}

    def save(step, epoch):
        if not info.is_main or last_saved["step"] == step:
            return
        last_saved["step"] = step
        state = training_state(model, optimizer, cfg, step=step, epoch=epoch, steps_per_epoch=steps_per_epoch)
        latest = os.path.join(run_dir, "checkpoint.pt")
        ckpt_io.save_checkpoint(state, latest)
        if step % steps_per_epoch == 0 and (step // steps_per_epoch) % cfg["training.checkpoint_every"] == 0:
            ckpt_io.save_checkpoint(state, ckpt_io.epoch_checkpoint_path(run_dir, step // steps_per_epoch))
            ckpt_io.prune_epoch_checkpoints(run_dir, cfg["training.keep_checkpoints"])

    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    step = start_step
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    try:
        start_epoch = start_step // steps_per_epoch
        for epoch in range(start_epoch, epochs):
            if step >= stop_step:
                break
            skip = step - epoch * steps_per_epoch
            member_counts = None
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}", unit="step",
                       disable=not (info.is_main and cfg["logging.progress"]), dynamic_ncols=True)
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            t_fetch = time.perf_counter()
            for images, labels, dataset_idx in loader.epoch(epoch, start_batch=skip):
                data_wait += time.perf_counter() - t_fetch
                counts = torch.bincount(dataset_idx, minlength=1)
                member_counts = counts if member_counts is None else _add_counts(member_counts, counts)
                masks = sample_masks(batch_size=images.shape[0], grid_size=grid, seed=cfg["training.seed"],
                                     step=step, rank=info.rank, **masking)
                if step == 0 and info.is_main:
                    save_mask_examples(run_dir, images, masks, grid)
                x = normalize_images(images, device, amp_dtype or torch.float32)  # (B, 3, H, W)
                out = train_step(model, forward, optimizer, x, masks_to_device(masks, device),
                                 **schedule_at(step), amp_dtype=amp_dtype, clip_grad=cfg["optim.clip_grad"])
                nonfinite |= ~torch.isfinite(out["loss"].detach())
                step += 1
                window_steps += 1
                bar.update(1)
                if step % cfg["logging.log_every"] == 0 or step == stop_step:
                    _check_finite(nonfinite, step, run_dir)  # a device sync point, like reading the loss below
                    elapsed = time.perf_counter() - window_start
                    record = _metrics_record(out, step, epoch, schedule_at(step - 1),
                                             images_per_s=window_steps * global_batch / elapsed,
                                             data_wait=data_wait / elapsed, flops_per_image=flops_per_image,
                                             peak_tflops=cfg["hardware.peak_tflops"])
                    if log:
                        log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                if stop_agreed(stop, step, cfg["logging.log_every"], info, device) or step >= stop_step:
                    break
                t_fetch = time.perf_counter()
            bar.close()
            if stop["signal"] is not None:
                raise StopRequested()
            if member_counts is not None and skip == 0 and step % steps_per_epoch == 0:
                member_counts = all_reduce_sum(member_counts.to(device), info).cpu()
                if log:
                    record = {"epoch": epoch, "step": step, "member_counts": member_counts.tolist()}
                    if loader.members:
                        record["member_names"] = [name for name, _ in loader.members]
                        record["expected_counts"] = [int(c) for c in loader.epoch_counts]
                    log.write(record)
            if info.enabled and skip == 0 and step % steps_per_epoch == 0:
                log_rank_overlap(log, loader, epoch, info, device)
            if monitor_loaders and step % steps_per_epoch == 0 and (epoch + 1) % cfg["logging.eval_every"] == 0:
                knn = knn_monitor(model.target_encoder, *monitor_loaders, device=device,
                                  dtype=amp_dtype or torch.float32)
                log.write({"epoch": epoch, "step": step, "knn_top1": knn})
                say(f"epoch {epoch}: k-NN top-1 {knn:.2f}% (target encoder)")
            if step % steps_per_epoch == 0 and ((epoch + 1) % cfg["training.checkpoint_every"] == 0
                                                or epoch + 1 == epochs):
                _check_finite(nonfinite, step, run_dir)
                save(step, epoch + 1)
        _check_finite(nonfinite, step, run_dir)
        save(step, step // steps_per_epoch)
        if info.enabled:  # DDP keeps ranks in lockstep; a mismatch here means a bug, so log it loudly
            sums = [float(x) for x in all_gather_tensor(parameter_checksum(model).to(device), info)]
            if log:
                log.write({"step": step, "param_checksums": sums})
            if len(set(sums)) > 1:
                print(f"warning: parameters differ across ranks: {sums}", file=sys.stderr)
        if info.is_main and cfg["logging.plots"]:
            log.close()
            say("pictures: " + ", ".join(draw_run(run_dir)))
        say(f"done: {step} steps; checkpoint {os.path.join(run_dir, 'checkpoint.pt')}")
    except StopRequested:
        _check_finite(nonfinite, step, run_dir)
        save(step, step // steps_per_epoch)
        say(f"stopped by signal {stop['signal']} at step {step}; resume with "
            f"--training.resume={os.path.join(run_dir, 'checkpoint.pt')}")
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        loader.close()
        for monitor_loader in monitor_loaders or ():
            monitor_loader.close()
        if log:
            log.close()
    return run_dir


def schedule_values(step, *, cfg, peak_lr, total_steps, warmup_steps):
    """{lr, weight_decay, momentum} at `step`: pure functions of the step (hjepa.schedules)."""
    o = "optim."
    return dict(
        lr=schedules.learning_rate(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                                   warmup_start_lr=peak_lr * cfg[o + "warmup_start_factor"], min_lr=cfg[o + "min_lr"]),
        weight_decay=schedules.weight_decay(step, total_steps=total_steps, start=cfg[o + "weight_decay"],
                                            end=cfg[o + "final_weight_decay"]),
        momentum=schedules.ema_momentum(step, total_steps=total_steps, start=cfg[o + "ema_start"],
                                        end=cfg[o + "ema_end"]))


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


def stop_agreed(stop, step, log_every, info, device):
    """Whether to stop for a signal now. Under DDP ranks agree at log steps (an all-reduce), so a
    signal that reaches ranks at different steps never leaves one rank waiting in the next all-reduce."""
    if not info.enabled:
        return stop["signal"] is not None
    if step % log_every:
        return False
    flag = torch.tensor([0.0 if stop["signal"] is None else 1.0], device=device)
    if all_reduce_sum(flag, info).item() > 0:
        stop["signal"] = stop["signal"] or "a peer rank's signal"
        return True
    return False


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


def _check_finite(nonfinite, step, run_dir):
    if bool(nonfinite):
        raise UserError(f"loss became NaN/Inf by step {step}; stopped, the last good checkpoint stays in {run_dir}")


def _metrics_record(out, step, epoch, schedule, *, images_per_s, data_wait, flops_per_image, peak_tflops):
    """One metrics.jsonl line; `schedule` is what the step that produced `out` ran with."""
    return {"step": step, "epoch": epoch, "lr": schedule["lr"], "wd": schedule["weight_decay"],
            "momentum": schedule["momentum"], "loss": float(out["loss"].detach()),
            "level_losses": [float(x) for x in out["level_losses"]],
            "target_std": float(out["target_std"]), "pred_std": float(out["pred_std"]),
            "grad_norm": float(out["grad_norm"]), "images_per_s": images_per_s,
            "data_wait_fraction": min(1.0, data_wait),
            "mfu": mfu(images_per_s, flops_per_image, peak_tflops) if peak_tflops > 0 else math.nan}


if __name__ == "__main__":
    main()
