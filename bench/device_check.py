"""Every GPU figure of the project from one command: loader, training speed, copy race, short run, memory.

    bench/device_check.sh [--out device_check.json] [--sections loader,train_vit_small,...] [--budget-s 480]
    bench/device_check.sh --smoke      # the same code paths on the CPU at toy sizes (make test runs it)

GPU time comes in short visits, so one call measures everything within --budget-s (a section that no
longer fits is skipped) and a hard limit (a watchdog writes what it has and exits 124). The JSON is
rewritten after every section; a section that raises records its error and the next one runs.

Sections, in order (data always runs; --sections picks among the others):
  data             photo-like JPEGs (300-500 px, landscape and portrait) drawn on every core, written
                   to a beton by the project's writer.
  loader           the train loader at --num-workers threads: uint8 images/s, and images/s moved to
                   the device and normalised there.
  copy_race        hjepa.copy_race on >= 500 loader batches: each batch's checksum taken on the host
                   before the copy equals the checksum of the device copy, while queued GPU work keeps
                   the host ahead; then the racy direct copy on 100 batches, which should mismatch.
  train_vit_small  ViT-S/16 as rn_configs/h100_100ep.yaml trains it (224 px, batch 256, bf16,
                   torch.compile): a few warm-up steps (the masks' shapes are fixed, so everything
                   compiles in the first), then one timed window on a device-resident batch (model
                   speed) and one fed by the loader (data-wait); MFU, graphs compiled after warm-up
                   (goal: none), peak memory.
  profile          where a compiled ViT-S step's time goes (hjepa.step_profile): CUDA kernel time by
                   kind (matmul, attention, inductor's fused kernels, optimizer/EMA, copies), the
                   largest kernels, and the host's time to queue a step against its wall time.
  short_run        300 steps of that ViT-S from its initial weights (its compiled graphs reused) with
                   the trainer's schedules on the generated beton: the loss must fall and target_std
                   stay above a floor.
  variants         ViT-S alternatives timed the same way: the loader-fed window at fewer loader threads,
                   with epochs as long as ImageNet-100's (the 4,000-image beton starts an FFCV epoch
                   every 15 steps) and with FFCV's fresh output buffers every epoch, then the other
                   hardware.compile_mode (default or reduce-overhead: CUDA graphs), then target blocks
                   cut to their real size (no padding; that dimension dynamic) on the GPU-resident batch.
  train_vit_base   as train_vit_small, for ViT-B/16: last, as its compilation costs the most.
The trainer and loader the training sections share are in bench/device_trainer.py, the variants section
in bench/device_variants.py.

Seconds budgeted per section (MIN_SECONDS; imports and CUDA start ~10, data always runs, ~10-15):
loader 20, copy_race 45, train_vit_small 110, profile 15, short_run 30, variants 170, train_vit_base 100.
One H100 ran them all in 325 s before the cut-blocks variant, and in 441 s with it (commit 76b4073,
--budget-s 480: the variant's failed compile and its retry with mix-order reductions off made variants
223 s, and train_vit_base started with 109 s left; compiles take 30-60 s each with a cold inductor cache;
README "GPU figures"). Hence the default budget of 480 s (8 minutes); the watchdog stops it at 540 s.
"""
import time

START = time.perf_counter()  # the budget counts from here: the imports below take seconds

import argparse
import math
import os
import sys
import tempfile

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script, this file's siblings import as bench.<module> from the root
    sys.path.insert(0, REPO_ROOT)

from bench.device_trainer import IN100_TRAIN_IMAGES, Trainer, train_loader
from bench.device_variants import section_variants
from hjepa.beton import read_manifest, write_beton
from hjepa.budgeted_run import BudgetedRun
from hjepa.compile_stats import compilation_records, compile_log, compiled_graphs, cudagraph_skips
from hjepa.config import load_config
from hjepa.copy_race import check_device_copies, direct_copy
from hjepa.device_report import TARGET_STD_FLOOR, TARGETS, print_table
from hjepa.loaders import images_to_device, normalize_images
from hjepa.engine import autocast_dtype
from hjepa.errors import UserError
from hjepa.flops import datasheet_peak_tflops
from hjepa.runlog import cpu_model, git_commit
from hjepa.schedules import schedule_values
from hjepa.sections import optim_config
from hjepa.sources import image_folder_samples
from hjepa.step_profile import summarize_profile
from hjepa.step_timing import (batches_forever, loader_fed_window, peak_memory_gib, reset_memory_stats, sync,
                               timed_window)
from hjepa.synthetic import write_photo_like_folder

SECTIONS = ("data", "loader", "copy_race", "train_vit_small", "profile", "short_run", "variants", "train_vit_base")
# Seconds a section takes on one H100, compiles included (see the docstring): one that no longer fits
# in what is left of --budget-s is skipped.
MIN_SECONDS = dict(data=0, loader=20, copy_race=45, train_vit_small=110, profile=15, short_run=30, variants=170,
                   train_vit_base=100)
# What differs between the GPU run and --smoke. warmup_steps: steps before the timed windows; the masks'
# shapes are fixed per masking config, so the graphs compile in the first and the rest show none follow;
# with CUDA graphs (reduce-overhead) step 0 runs the compiled graphs, step 1 records them, step 2 replays.
GPU = dict(config="rn_configs/h100_100ep.yaml", overrides={}, archs=("vit_small", "vit_base"), num_images=4000,
           image_sides=(300, 500), loader_seconds=4.0, warmup_steps=3, timed_steps=50, race_steps=500,
           control_steps=100, short_steps=300, profile_steps=5, compile_backend="inductor", min_seconds=MIN_SECONDS)
SMOKE = dict(config="rn_configs/cpu_demo.yaml", archs=("vit_micro", "vit_micro"), num_images=64, image_sides=(40, 64),
             overrides={"data.image_size": 32, "model.patch_size": 4, "data.batch_size": 8, "cfg.short_side": 40},
             loader_seconds=0.0, warmup_steps=2, timed_steps=3, race_steps=12, control_steps=4, short_steps=16,
             profile_steps=2,
             compile_backend="eager",  # dynamo's graph capture and guards without minutes of inductor codegen
             min_seconds=dict.fromkeys(SECTIONS, 0))


# ----------------------------------------------------------------------------------------------
# The run: what the sections share (budget, partial JSON and watchdog: hjepa.budgeted_run)


class Run(BudgetedRun):
    def __init__(self, args):
        self.args, self.size = args, dict(SMOKE if args.smoke else GPU)
        for key in ("num_images", "timed_steps", "race_steps", "short_steps", "compile_backend"):
            self.size[key] = getattr(args, key) or self.size[key]  # a command-line value wins
        if args.compile_mode:
            self.size["overrides"] = dict(self.size["overrides"], **{"hardware.compile_mode": args.compile_mode})
            self.config(self.size["archs"][0])  # a mode that is not one fails here, before any section
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                                   else args.device)
        self.peak_tflops = None  # known once describe_device has run
        self.kept = {}  # what later sections reuse: the beton, the loader, the ViT-S trainer
        meta = {"device": self.device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "git_commit": git_commit(REPO_ROOT),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "sizes": self.size}
        super().__init__(out=args.out, budget_s=args.budget_s, hard_limit_s=args.hard_limit_s, start=START,
                         results={"meta": meta, "targets": TARGETS, "sections": {}})

    def describe_device(self):
        """Name the device: on CUDA this creates the context, which the data section's forked workers must
        not inherit, so it runs after that section."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({cpu_model()})"
        # --peak-tflops for a card not in the table; 0 = unknown: MFU is left out
        self.peak_tflops = (self.device.type == "cuda" and datasheet_peak_tflops(name)) or self.args.peak_tflops
        self.results["meta"].update(device=name, peak_bf16_tflops=self.peak_tflops)
        self.say(f"device: {name}")

    def config(self, arch, overrides=None):
        overrides = dict(self.size["overrides"], **{"model.arch": arch}, **(overrides or {}))
        return load_config([os.path.join(REPO_ROOT, self.size["config"])], overrides=overrides)


# ----------------------------------------------------------------------------------------------
# data, loader


def section_data(run):
    cfg, num_images = run.config(run.size["archs"][0]), run.size["num_images"]
    work_dir = run.args.work_dir or tempfile.mkdtemp(prefix="device_check_")
    root, beton = os.path.join(work_dir, f"images_{num_images}"), os.path.join(work_dir, f"train_{num_images}.beton")
    run.kept["beton"] = beton
    if os.path.isfile(beton) and read_manifest(beton)["num_samples"] == num_images:
        return run.record(beton=beton, num_images=num_images, reused=True)
    t0 = time.perf_counter()
    write_photo_like_folder(root, num_images, sides=run.size["image_sides"], num_workers=os.cpu_count())
    draw_s, t0 = time.perf_counter() - t0, time.perf_counter()
    samples, class_names, _ = image_folder_samples(root, ".")  # nothing else lies in the folder
    write_beton(samples, beton, dataset="device_check", split="train", class_names=class_names, source=root,
                short_side=cfg["cfg.short_side"], max_side=cfg["cfg.max_side"], jpeg_quality=cfg["cfg.jpeg_quality"],
                write_mode="jpg", num_workers=os.cpu_count(), progress=False)
    run.record(beton=beton, num_images=num_images, image_sides=run.size["image_sides"], draw_s=round(draw_s, 1),
               write_s=round(time.perf_counter() - t0, 1), beton_mb=round(os.path.getsize(beton) / 2**20, 1),
               short_side=cfg["cfg.short_side"], max_side=cfg["cfg.max_side"], jpeg_quality=cfg["cfg.jpeg_quality"])


def section_loader(run):
    loader = train_loader(run, run.config(run.size["archs"][0]))
    dtype = autocast_dtype(run.device, True) or torch.float32

    def images_per_s(to_device, first_epoch):
        count, epoch, t0 = 0, first_epoch, time.perf_counter()
        while epoch < first_epoch + 2 or time.perf_counter() - t0 < run.size["loader_seconds"]:
            for images, _, _ in loader.epoch(epoch):
                if to_device:
                    normalize_images(images, run.device, dtype)  # (B, 3, H, W) on the device
                count += images.shape[0]
            epoch += 1
        sync(run.device)
        return round(count / (time.perf_counter() - t0)), epoch

    t0 = time.perf_counter()
    for _ in loader.epoch(0):  # numba compiles the pipeline during the first epoch
        pass
    run.record(num_workers=loader.loader.num_workers, batch_size=loader.batch_size,
               warmup_epoch_s=round(time.perf_counter() - t0, 1), device_dtype=str(dtype))
    uint8_img_s, epoch = images_per_s(False, 1)
    run.record(uint8_img_s=uint8_img_s, to_device_normalised_img_s=images_per_s(True, epoch)[0])


# ----------------------------------------------------------------------------------------------
# copy_race


def section_copy_race(run):
    """hjepa.copy_race on the shared loader: the trainer's copy (images_to_device, which normalize_images
    calls) on race_steps batches, then the racy direct copy as a control."""
    loader = train_loader(run, run.config(run.size["archs"][0]))
    for name, to_device, steps in (("staged", images_to_device, run.size["race_steps"]),
                                   ("direct", direct_copy, run.size["control_steps"])):
        source = batches_forever(loader)
        next(source)  # start the epoch thread outside the check
        try:
            result = check_device_copies(source, run.device, steps=steps, to_device=to_device)
        finally:
            source.close()
        if name == "staged":
            run.record(**result, copy_function="hjepa.loaders.images_to_device")
        else:  # a control: only a mismatch here is news (the check can see a race)
            run.record(direct_copy_control={"race_seen": not result["passed"], **result})


# ----------------------------------------------------------------------------------------------
# train_vit_small, profile, short_run, variants, train_vit_base (timed windows: hjepa.step_timing)


def section_train(arch_index):
    def section(run):
        # An empty dynamo cache, as a training process starts with: both models run HJEPA.forward, and
        # ViT-S's graphs (used by the short run, which comes before ViT-B) would otherwise sit in the
        # same frame's cache and shape ViT-B's compile (dimensions that differ become dynamic).
        torch._dynamo.reset()
        if arch_index == 1:
            run.kept.pop("vit_small", None)  # the short run is done: free its memory
        cfg = run.config(run.size["archs"][arch_index])
        memory0 = reset_memory_stats(run.device)
        trainer = Trainer(run, cfg)
        if arch_index == 0:
            run.kept["vit_small"] = trainer  # the short run starts from its initial weights
        log0, graphs0, skips0 = len(compilation_records()), compiled_graphs(), cudagraph_skips()
        run.record(arch=cfg["model.arch"], image_size=cfg["data.image_size"], patch_size=cfg["model.patch_size"],
                   batch_size=trainer.batch, amp=str(trainer.amp_dtype), compile_backend=run.size["compile_backend"],
                   compile_mode=trainer.compile_mode,
                   train_gflops_per_image=round(trainer.flops / 1e9, 2),
                   peak_bf16_tflops=run.peak_tflops)

        # Warm-up on a device-resident batch, as the trainer's first steps go. Every input has the same
        # shape each step (masks fixed per masking config), so dynamo compiles in step 0 only;
        # new_graph_steps lists the steps that compiled anything, to show it.
        side = cfg["data.image_size"]
        device_batch = torch.randint(0, 256, (trainer.batch, 3, side, side), dtype=torch.uint8,
                                     device=run.device).contiguous(memory_format=torch.channels_last)
        if arch_index == 0:
            run.kept["device_batch"] = device_batch  # the profile and the variants time on it too
        new_graph_steps, t0 = [], time.perf_counter()
        for step in range(run.size["warmup_steps"]):
            before = compiled_graphs()
            trainer.step(step, device_batch)
            if compiled_graphs() != before:
                new_graph_steps.append(step)
                run.say(f"  warm-up, step {step}: {compiled_graphs() - graphs0} graphs compiled so far")
        step = run.size["warmup_steps"]
        sync(run.device)
        run.record(warmup_steps=step, warmup_s=round(time.perf_counter() - t0, 1),
                   graphs_compiled_in_warmup=compiled_graphs() - graphs0, new_graph_steps=new_graph_steps,
                   compiles=compile_log(log0), cudagraph_skips=cudagraph_skips() - skips0)

        steps, graphs_warm = run.size["timed_steps"], compiled_graphs()
        run.record(device_batch=timed_window(trainer, lambda: device_batch, steps, step, run.peak_tflops))
        loader_fed = loader_fed_window(trainer, train_loader(run, cfg), steps, step + steps, run.peak_tflops)
        steps_per_epoch = IN100_TRAIN_IMAGES // trainer.batch
        run.record(loader_fed=loader_fed, timed_steps=steps, recompiles_after_warmup=compiled_graphs() - graphs_warm,
                   compiles=compile_log(log0), graphs_compiled=compiled_graphs() - graphs0,
                   peak_memory_gib=peak_memory_gib(run.device), peak_memory_above_start_gib=peak_memory_gib(run.device, memory0),
                   in100_100ep_minutes=round(100 * steps_per_epoch * loader_fed["step_ms"] / 60_000, 1))
        trainer.optimizer = None  # the short run makes its own

    return section


def section_short_run(run):
    cfg = run.config(run.size["archs"][0])
    trainer = run.kept.get("vit_small")
    if trainer is None:  # train_vit_small did not run: build and compile one here
        trainer = Trainer(run, cfg)
    trainer.model.load_state_dict(trainer.initial_state)  # in place: the compiled graphs stay valid
    trainer.optimizer = trainer.new_optimizer()
    reset_memory_stats(run.device)
    steps, optim = run.size["short_steps"], optim_config(cfg)
    warmup_steps = round(steps * optim.warmup_epochs / cfg["training.epochs"])  # the config's share
    losses, target_std = torch.empty(steps, device=run.device), torch.empty(steps, device=run.device)
    graphs0, done = compiled_graphs(), 0
    source = batches_forever(train_loader(run, cfg))
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            if run.out_of_time():
                break
            out = trainer.step(step, next(source), schedule_values(step, optim, total_steps=steps, warmup_steps=warmup_steps,
                                                                   global_batch=trainer.batch))
            losses[step], target_std[step] = out["loss"].detach(), out["target_std"]  # stay on the device
            done = step + 1
    finally:
        source.close()
    sync(run.device)
    seconds = time.perf_counter() - t0
    losses, target_std = losses[:done].cpu().tolist(), target_std[:done].cpu().tolist()
    window = max(1, done // 10)
    loss_start, loss_end = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    run.record(arch=cfg["model.arch"], steps=done, steps_asked=steps, loss_start=round(loss_start, 4),
               loss_end=round(loss_end, 4), loss_window_steps=window, loss_every_10=[round(v, 4) for v in losses[::10]],
               target_std_start=round(target_std[0], 4), target_std_end=round(target_std[-1], 4),
               target_std_min=round(min(target_std), 4), target_std_floor=TARGET_STD_FLOOR,
               all_finite=all(map(math.isfinite, losses)), img_s=round(done * trainer.batch / seconds, 1),
               recompiles=compiled_graphs() - graphs0, peak_memory_gib=peak_memory_gib(run.device),
               passed=done == steps and loss_end < loss_start and min(target_std) > TARGET_STD_FLOOR)


def section_profile(run):
    """Where a compiled ViT-S step goes (hjepa.step_profile): kernel time by kind and the largest kernels
    over profile_steps steps, and per step the host's time to queue it against the wall time with a sync
    (host close to wall: launch-bound; kernels' total close to wall: the GPU is the limit)."""
    trainer, batch = run.kept.get("vit_small"), run.kept.get("device_batch")
    if trainer is None or batch is None:
        raise RuntimeError("no ViT-S trainer and batch: train_vit_small did not run")
    trainer.optimizer = trainer.new_optimizer()
    first, steps = 100_000, run.size["profile_steps"]
    host_ms, wall_ms = [], []
    for step in range(first, first + steps):
        sync(run.device)
        t0 = time.perf_counter()
        trainer.step(step, batch)
        host_ms.append(1000 * (time.perf_counter() - t0))
        sync(run.device)
        wall_ms.append(1000 * (time.perf_counter() - t0))
    on_device = run.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_device else [])
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(first + steps, first + 2 * steps):
            trainer.step(step, batch)
        sync(run.device)
    summary = summarize_profile(prof.key_averages(), steps, on_device)
    wall = float(np.median(wall_ms))
    timed = "CUDA kernels" if on_device else "CPU ops, self time"
    run.record(arch=trainer.cfg["model.arch"], steps=steps, timed=timed,
               host_queue_ms_per_step=round(float(np.median(host_ms)), 2), wall_ms_per_step=round(wall, 2),
               busy_fraction=round(summary["total_ms_per_step"] / wall, 4), **summary)


SECTION_FUNCTIONS = {"data": section_data, "loader": section_loader, "copy_race": section_copy_race,
                     "train_vit_small": section_train(0), "profile": section_profile, "short_run": section_short_run,
                     "variants": section_variants,
                     "train_vit_base": section_train(1)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU-sized toy run of every section (seconds)")
    p.add_argument("--sections", default=",".join(SECTIONS[1:]), help="comma-separated, from " + ",".join(SECTIONS[1:]))
    p.add_argument("--out", default="device_check.json", help="JSON results, rewritten after every section")
    p.add_argument("--budget-s", type=float, default=480.0, help="no section starts that no longer fits in it")
    p.add_argument("--hard-limit-s", type=float, default=0.0, help="watchdog: save and exit 124 (0: budget + 60 s)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 TFLOP/s of a card not in the table")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--work-dir", default="", help="folder for the images and beton (kept, and reused when present)")
    p.add_argument("--num-workers", type=int, default=0, help="loader threads (0 = every core)")
    p.add_argument("--num-images", type=int, default=0, help="images to draw (0: 4000, smoke 64)")
    p.add_argument("--timed-steps", type=int, default=0, help="steps per timed window (0: 50, smoke 3)")
    p.add_argument("--race-steps", type=int, default=0, help="copy-race batches (0: 500, smoke 12)")
    p.add_argument("--short-steps", type=int, default=0, help="short-run steps (0: 300, smoke 16)")
    p.add_argument("--compile-backend", default="", help="torch.compile backend (default inductor, smoke eager)")
    p.add_argument("--compile-mode", default="", help="hardware.compile_mode of every trainer (default: the config's)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS[1:])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    args.hard_limit_s = args.hard_limit_s or args.budget_s + 60
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Importing ffcv set torch's threads to 1; the trainer uses every core. On the CPU (--smoke) the loader's
    # threads share those cores, and two thread pools spinning on them made a step 30x slower.
    torch.set_num_threads(1 if args.smoke else os.cpu_count() or 1)
    if torch.cuda.is_available():  # as hjepa/train.py: TF32 for what autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = Run(args)
    run.start_watchdog(report=print_table)
    run.say(f"budget {args.budget_s:.0f} s, hard limit {args.hard_limit_s:.0f} s from the start; writing {args.out}")
    run.run("data", section_data)
    run.describe_device()
    for name in SECTIONS[1:]:
        if name in args.sections.split(","):
            run.run(name, SECTION_FUNCTIONS[name], needs_s=run.size["min_seconds"][name])
    if "loader" in run.kept:
        run.kept["loader"].close()
    run.finish()
    print_table(run.results)
    print(f"wrote {args.out}")
    return 0 if run.passed() else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
