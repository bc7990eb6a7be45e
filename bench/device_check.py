"""Every GPU figure of the project from one command: loader, training speed, copy race, short run, memory.

    bench/device_check.sh [--out device_check.json] [--sections loader,train_vit_small,...] [--budget-s 450]
    bench/device_check.sh --smoke      # the same code paths on the CPU at toy sizes (make test runs it)

GPU time comes in short visits, so one call measures everything within --budget-s (a section that no
longer fits is skipped) and a hard limit (a watchdog writes what it has and exits 124). The JSON is
rewritten after every section; a section that raises records its error and the next one runs.

Sections, in order (data always runs; --sections picks among the others):
  data             photo-like JPEGs (300-500 px, landscape and portrait) drawn on every core, written
                   to a beton by the project's writer.
  loader           the train loader at --num-workers threads: uint8 images/s, and images/s moved to
                   the device and normalised there.
  copy_race        >= 500 loader batches: each batch's checksum taken on the host before the copy
                   equals the checksum of the device copy, while queued GPU work keeps the host ahead.
  train_vit_small  ViT-S/16 as rn_configs/h100_100ep.yaml trains it (224 px, batch 256, bf16,
                   torch.compile): warm-up until no new graphs, then one timed window on a
                   device-resident batch (model speed) and one fed by the loader (data-wait); MFU,
                   graphs compiled after warm-up, peak memory.
  short_run        300 steps of that ViT-S from its initial weights (its compiled graphs reused) with
                   the trainer's schedules on the generated beton: the loss must fall and target_std
                   stay above a floor.
  train_vit_base   as train_vit_small, for ViT-B/16: last, as its compilations cost the most.
"""
import time

START = time.perf_counter()  # the budget counts from here: the imports below take seconds

import argparse
import copy
import functools
import json
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import traceback

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # run by path from anywhere

import numpy as np
import torch
from PIL import Image

from hjepa.beton import read_manifest, write_beton
from hjepa.config import load_config
from hjepa.data import IMAGENET_MEAN, IMAGENET_STD, build_train_loader, normalize_images
from hjepa.engine import autocast_dtype, build_optimizer, masks_to_device, train_step
from hjepa.errors import UserError
from hjepa.flops import mfu, train_flops_per_image
from hjepa.masks import sample_masks
from hjepa.model import build_model
from hjepa.runlog import cpu_model, git_commit
from hjepa.sources import image_folder_samples
from hjepa.synthetic import KINDS, draw_image
from hjepa.config import mask_config, model_config, optim_config
from hjepa.schedules import schedule_values

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("data", "loader", "copy_race", "train_vit_small", "short_run", "train_vit_base")
# What differs between the GPU run and --smoke. warmup: (min steps, steps without a new graph, max steps).
GPU = dict(config="rn_configs/h100_100ep.yaml", overrides={}, archs=("vit_small", "vit_base"), num_images=4000,
           image_sides=(300, 500), loader_seconds=4.0, warmup=(15, 10, 60), timed_steps=50, race_steps=500,
           short_steps=300, compile_backend="inductor",
           # seconds a section needs at least (compiles included); one that no longer fits is skipped
           min_seconds=dict(data=0, loader=15, copy_race=25, train_vit_small=100, short_run=25, train_vit_base=100))
SMOKE = dict(config="rn_configs/cpu_demo.yaml", archs=("vit_micro", "vit_micro"), num_images=64, image_sides=(40, 64),
             overrides={"data.image_size": 32, "model.patch_size": 4, "data.batch_size": 8, "cfg.max_resolution": 64},
             loader_seconds=0.0, warmup=(2, 2, 6), timed_steps=3, race_steps=12, short_steps=16,
             compile_backend="eager",  # dynamo's graph capture and guards without minutes of inductor codegen
             min_seconds=dict.fromkeys(SECTIONS, 0))
# Dense bf16 TFLOP/s per GPU from the vendors' datasheets (half the "with sparsity" figure); the first key
# found in torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0))
IN100_TRAIN_IMAGES = 126_689  # the ImageNet-100 train split (README)
TARGETS = {"vit_small_img_s": 6000.0, "vit_base_img_s": 3200.0, "data_wait_fraction": 0.02,
           "in100_100ep_minutes": 40.0}  # on one H100; README marks them as targets until measured
# target_std (HJEPA.forward) is the std over the batch of layer-normed target features, which have unit
# variance over their D dims per token (the smoke run's vit_micro shows 0.33-0.39); it goes to 0 when every
# image maps to the same features. Target blocks sit at different positions in different images, so only a
# collapse to position-independent constant features reaches 0: 0.05 flags that, with room for noise.
TARGET_STD_FLOOR = 0.05


def peak_tflops(device, fallback):
    """Dense bf16 TFLOP/s of the card by name, else --peak-tflops (0 = unknown: MFU is left out)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), fallback)


# ----------------------------------------------------------------------------------------------
# The run: sections, budget, partial JSON, watchdog


class Run:
    def __init__(self, args):
        self.args, self.start, self.current = args, START, None
        self.size = dict(SMOKE if args.smoke else GPU)
        for key in ("num_images", "timed_steps", "race_steps", "short_steps", "compile_backend"):
            self.size[key] = getattr(args, key) or self.size[key]  # a command-line value wins
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                                   else args.device)
        self.peak_tflops = None  # known once describe_device has run
        self.kept = {}  # what later sections reuse: the beton, the loader, the ViT-S trainer
        self.lock = threading.RLock()
        self.results = {"meta": {"device": self.device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                                 "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                                 "git_commit": git_commit(REPO_ROOT),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
                                 "sizes": self.size},
                        "targets": TARGETS, "sections": {}}

    def describe_device(self):
        """Name the device: on CUDA this creates the context, which the data section's forked workers must
        not inherit, so it runs after that section."""
        self.peak_tflops = peak_tflops(self.device, self.args.peak_tflops)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({cpu_model()})"
        self.results["meta"].update(device=name, peak_bf16_tflops=self.peak_tflops)
        self.say(f"device: {name}")

    def config(self, arch):
        overrides = dict(self.size["overrides"], **{"model.arch": arch})
        return load_config([os.path.join(REPO_ROOT, self.size["config"])], overrides=overrides)

    def elapsed(self):
        return time.perf_counter() - self.start

    def out_of_time(self):
        return self.elapsed() > self.args.budget_s

    def say(self, message):
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save(self):
        with self.lock:  # the watchdog thread saves too
            self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
            with open(self.args.out + ".partial", "w") as f:
                json.dump(self.results, f, indent=2, default=str)
            os.replace(self.args.out + ".partial", self.args.out)

    def record(self, **figures):
        """Add figures to the running section and rewrite the JSON, so a timeout keeps them."""
        with self.lock:
            self.results["sections"][self.current].update(figures)
            self.save()

    def run(self, name, section):
        self.current = name
        self.results["sections"][name] = entry = {"status": "running", "started_at_s": round(self.elapsed(), 1)}
        left, needed = self.args.budget_s - self.elapsed(), self.size["min_seconds"][name]
        if left < needed:
            entry.update(status="skipped", reason=f"{left:.0f} s of the budget left, the section needs {needed} s")
            self.say(f"skip {name}: {entry['reason']}")
            return self.save()
        self.say(f"--- {name}")
        try:
            section(self)
            entry["status"] = "ok"
        except Exception as e:  # a GPU visit must not be lost to one bug: record it, go on, exit 1 at the end
            traceback.print_exc()
            entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = round(self.elapsed() - entry["started_at_s"], 1)
        self.say(f"{name}: {entry['status']} in {entry['seconds']} s")
        self.save()

    def start_watchdog(self):
        def expire():
            with self.lock:
                if self.current:
                    self.results["sections"][self.current]["status"] = "timed_out"
                self.results["meta"]["timed_out_at_s"] = round(self.elapsed(), 1)
                self.save()
            print(f"hard limit of {self.args.hard_limit_s:.0f} s reached; partial results in {self.args.out}")
            print_table(self.results)
            os._exit(124)

        timer = threading.Timer(self.args.hard_limit_s, expire)
        timer.daemon = True
        timer.start()


# ----------------------------------------------------------------------------------------------
# data, loader


def _draw_jpeg(job):
    path, kind, key, (lo, hi) = job
    rng = np.random.default_rng(key)
    long_side = int(rng.integers((lo + hi) // 2, hi + 1))
    short_side = int(rng.integers(lo, long_side + 1))
    size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)  # landscape or portrait
    Image.fromarray(draw_image(kind, rng, size)).save(path, format="JPEG", quality=90)


def section_data(run):
    cfg, num_images = run.config(run.size["archs"][0]), run.size["num_images"]
    work_dir = run.args.work_dir or tempfile.mkdtemp(prefix="device_check_")
    root, beton = os.path.join(work_dir, f"images_{num_images}"), os.path.join(work_dir, f"train_{num_images}.beton")
    run.kept["beton"] = beton
    if os.path.isfile(beton) and read_manifest(beton)["num_samples"] == num_images:
        return run.record(beton=beton, num_images=num_images, reused=True)
    jobs = []
    for label, kind in enumerate(KINDS[:10]):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        jobs += [(os.path.join(root, kind, f"{i}.jpg"), kind, [label, i], run.size["image_sides"])
                 for i in range(label, num_images, 10)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_draw_jpeg, jobs, chunksize=8)
    draw_s, t0 = time.perf_counter() - t0, time.perf_counter()
    samples, class_names = image_folder_samples(root, ".")
    write_beton(samples, beton, dataset="device_check", split="train", class_names=class_names, source=root,
                max_resolution=cfg["cfg.max_resolution"], jpeg_quality=cfg["cfg.jpeg_quality"], write_mode="jpg",
                num_workers=os.cpu_count(), progress=False)
    run.record(beton=beton, num_images=num_images, image_sides=run.size["image_sides"], draw_s=round(draw_s, 1),
               write_s=round(time.perf_counter() - t0, 1), beton_mb=round(os.path.getsize(beton) / 2**20, 1),
               max_resolution=cfg["cfg.max_resolution"], jpeg_quality=cfg["cfg.jpeg_quality"])


def train_loader(run, cfg):
    """One train loader, shared by the sections: each new FFCV Loader pays its numba compilation."""
    if "loader" not in run.kept:
        if "beton" not in run.kept:
            raise RuntimeError("no beton: the data section did not run")
        run.kept["loader"] = build_train_loader(
            run.kept["beton"], batch_size=cfg["data.batch_size"], num_workers=run.args.num_workers or os.cpu_count(),
            image_size=cfg["data.image_size"], crop_scale=cfg["data.crop_scale"],
            flip=cfg["data.flip"], in_memory=True, order="random", seed=0)
    return run.kept["loader"]


def batches_forever(loader, first_epoch=0):
    """uint8 (B, 3, H, W) host batches, epoch after epoch; close() stops the loader's thread."""
    epoch = first_epoch
    while True:
        for images, _, _ in loader.epoch(epoch):
            yield images
        epoch += 1


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
        run.sync()
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


def copy_to_device(images, device):
    """The trainer's host->device copy of a uint8 batch. float32 here (the trainer casts to bf16 after
    the same copy), so that recover_uint8 gets the exact bytes back."""
    return normalize_images(images, device, torch.float32)


@functools.lru_cache(maxsize=None)
def _denormalisation(device):
    """(scale, shift), each (1, 3, 1, 1) on `device`, made once: a tensor built from host values on each
    step would be a copy from pageable memory, which waits for the GPU and would stop the host running ahead."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (255 * std).to(device), (255 * mean).to(device)


def recover_uint8(x):
    """Undo normalize_images: float32 (B, 3, H, W) -> the uint8 images (fp32 rounding error << 0.5)."""
    scale, shift = _denormalisation(x.device)
    return torch.round(x * scale + shift).clamp_(0, 255).to(torch.uint8)


def batch_checksum(images):
    """(B,) int64: a position-weighted checksum of each uint8 (B, 3, H, W) image, the same on any device.

    Sums the channels-last bytes as 8-byte words by row and by column and weights the sums by position;
    int64 arithmetic wraps modulo 2**64, so the order of summation does not change the result.
    """
    b, c, h, w = images.shape
    if (w * c) % 8:
        raise ValueError(f"a row of {w} x {c} bytes is not a whole number of 8-byte words")
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # a view when the batch is channels-last already
    if nhwc.storage_offset() % 8:
        nhwc = nhwc.clone()  # int64 words need 8-byte alignment
    words = nhwc.view(b, h, w * c).view(torch.int64)  # (B, H, 3W/8)
    rows = words.sum(2) * torch.arange(1, h + 1, device=images.device)  # (B, H)
    cols = words.sum(1) * torch.arange(1, words.shape[2] + 1, device=images.device)  # (B, 3W/8)
    return rows.sum(1) + 1_000_003 * cols.sum(1)


def section_copy_race(run):
    loader, steps, device = train_loader(run, run.config(run.size["archs"][0])), run.size["race_steps"], run.device
    host_sums = torch.empty((steps, loader.batch_size), dtype=torch.int64)
    device_sums = torch.empty((steps, loader.batch_size), dtype=torch.int64, device=device)
    cuda = device.type == "cuda"
    cycles_per_ms = busy_ms = host_ms = 0.0
    if cuda:  # torch.cuda._sleep spins the GPU for a number of clock cycles: how many make a millisecond
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    pending, leads, max_lead = [], [], 32  # events of the steps still queued on the GPU
    source = batches_forever(loader)
    next(source)  # start the epoch thread outside the loop
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            t_work = time.perf_counter()
            images = next(source)
            host_sums[step] = batch_checksum(images)  # on the host, before the copy
            if cuda:
                # GPU work ahead of the copy, 1.5x the host's time per step: the host runs ahead and the
                # loader refills its buffers while their copies still wait in the stream.
                torch.cuda._sleep(int(cycles_per_ms * busy_ms))
            x = copy_to_device(images, device)  # (B, 3, H, W) float32
            device_sums[step] = batch_checksum(recover_uint8(x))  # no host sync
            host_ms = 0.8 * host_ms + 0.2 * 1000 * (time.perf_counter() - t_work)  # without the wait below
            busy_ms = min(100.0, 1.5 * host_ms)
            if cuda:
                pending.append(torch.cuda.Event())
                pending[-1].record()
                if len(pending) > max_lead:
                    pending.pop(0).synchronize()  # bound the lead (and the pinned memory it holds)
                pending = [e for e in pending if not e.query()]
                leads.append(len(pending))
    finally:
        source.close()
    run.sync()
    mismatched = (device_sums.cpu() != host_sums).any(dim=1)  # (steps,)
    run.record(steps=steps, batch_size=loader.batch_size, mismatched_batches=int(mismatched.sum()),
               first_mismatch_step=int(mismatched.nonzero()[0]) if mismatched.any() else None,
               host_lead_steps_mean=round(float(np.mean(leads)), 1) if leads else 0.0,
               host_lead_steps_max=max(leads, default=0), host_step_ms=round(host_ms, 1),
               loop_s=round(time.perf_counter() - t0, 1), passed=not bool(mismatched.any()),
               copy_function=f"{copy_to_device.__name__} -> hjepa.data.normalize_images")


# ----------------------------------------------------------------------------------------------
# train_vit_small, short_run, train_vit_base


def compiled_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_log(since):
    """[{id, frame, seconds, reason}] of the dynamo compilations after the first `since` records."""
    from torch._dynamo.utils import get_compilation_metrics

    def field(m, name):  # the record's fields vary between torch releases
        return getattr(m, name, None)

    return [{"id": field(m, "compile_id"), "frame": field(m, "co_name"),
             "seconds": round(field(m, "entire_frame_compile_time_s") or 0.0, 1),
             "reason": str(field(m, "recompile_reason") or "")[:300],
             **({"failed": str(field(m, "fail_reason"))[:300]} if field(m, "fail_reason") else {})}
            for m in list(get_compilation_metrics())[since:]]


class Trainer:
    """A model, its optimizer and compiled forward, stepped as hjepa/train.py steps them."""

    def __init__(self, run, cfg):
        self.cfg, self.device, self.batch = cfg, run.device, cfg["data.batch_size"]
        torch.manual_seed(0)
        self.model = build_model(model_config(cfg)).to(self.device)
        self.initial_state = copy.deepcopy(self.model.state_dict())
        self.optimizer = self.new_optimizer()
        self.forward = torch.compile(self.model, backend=run.size["compile_backend"])  # as hjepa/train.py does
        self.amp_dtype = autocast_dtype(self.device, cfg["hardware.bf16"])
        self.masking, self.grid = mask_config(cfg), self.model.grid_size
        self.target_shapes_seen = set()  # (th, tw) of the masks stepped so far

    def new_optimizer(self):
        return build_optimizer(self.model, lr=self.cfg["optim.lr"], weight_decay=self.cfg["optim.weight_decay"],
                               betas=(self.cfg["optim.beta1"], self.cfg["optim.beta2"]))

    def masks(self, step):
        return sample_masks(self.masking, batch_size=self.batch, grid_size=self.grid, seed=0, step=step)

    def step(self, step, images, schedule=None):
        masks = self.masks(step)
        self.target_shapes_seen.add(masks.tgt_shape)
        x = normalize_images(images, self.device, self.amp_dtype or torch.float32)  # (B, 3, H, W)
        return train_step(self.model, self.forward, self.optimizer, x, masks_to_device(masks, self.device),
                          **(schedule or dict(lr=1e-4, weight_decay=0.05, momentum=0.996)), amp_dtype=self.amp_dtype)


# Both models run in this one process through the same HJEPA.forward, so they share dynamo's cache for
# it: the limit on cache entries per frame (8 by default, then the frame runs uncompiled) is raised to
# hold both models' graphs, and ViT-B starts with the token-count dimensions that ViT-S saw vary
# already dynamic, saving it compilations that each cost a minute on a GPU. A training process holds
# one model: its own graph count is what the trainer sees, reported against the default limit.
RECOMPILE_LIMIT_HERE = 64


def share_compile_cache():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    default = getattr(config, name)
    setattr(config, name, max(default, RECOMPILE_LIMIT_HERE))
    return default


def reset_memory_stats(run):
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
    return torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else 0


def peak_memory_gib(run, baseline=0):
    if run.device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(run.device) - baseline) / 2**30, 2)


def section_train(arch_index):
    def section(run):
        from torch._dynamo.utils import get_compilation_metrics

        cfg = run.config(run.size["archs"][arch_index])
        memory0 = reset_memory_stats(run)
        trainer = Trainer(run, cfg)
        if arch_index == 0:
            run.kept["vit_small"] = trainer  # the short run starts from its initial weights
        grid, log0, graphs0 = trainer.grid, len(get_compilation_metrics()), compiled_graphs()
        flops = train_flops_per_image(trainer.model.model_config, masking=trainer.masking,
                                      num_patches=grid[0] * grid[1])
        run.record(arch=cfg["model.arch"], image_size=cfg["data.image_size"], patch_size=cfg["model.patch_size"],
                   batch_size=trainer.batch, amp=str(trainer.amp_dtype), compile_backend=run.size["compile_backend"],
                   train_gflops_per_image=round(flops / 1e9, 2), peak_bf16_tflops=run.peak_tflops)

        # Warm-up on a device-resident batch, as the trainer's first steps go, until `quiet` steps in a row
        # compiled nothing new; then one step on the masks of each target-block shape that the steps to
        # come (the timed windows; for ViT-S the short run too) hold and the warm-up did not, so that no
        # compilation lands in a timed window. new_graph_steps says where the trainer itself compiles.
        side = cfg["data.image_size"]
        device_batch = torch.randint(0, 256, (trainer.batch, 3, side, side), dtype=torch.uint8,
                                     device=run.device).contiguous(memory_format=torch.channels_last)
        min_steps, quiet, max_steps = run.size["warmup"]
        step, last_new, new_graph_steps, t0 = 0, 0, [], time.perf_counter()

        def warmup_step(at):
            before = compiled_graphs()
            trainer.step(at, device_batch)
            if compiled_graphs() != before:
                new_graph_steps.append(at)
                run.say(f"  warm-up, step {at}: {compiled_graphs() - graphs0} graphs compiled so far")
                return True
            return False

        while step < max_steps and not run.out_of_time():
            last_new = step + 1 if warmup_step(step) else last_new
            step += 1
            if step >= min_steps and step - last_new >= quiet:
                break
        horizon = step + 2 * run.size["timed_steps"] + (run.size["short_steps"] if arch_index == 0 else 0)
        shapes_ahead = {}
        for future in range(step, horizon):
            shapes_ahead.setdefault(trainer.masks(future).tgt_shape, future)
        extra = [at for shape, at in shapes_ahead.items() if shape not in trainer.target_shapes_seen]
        for at in extra:
            if not run.out_of_time():
                warmup_step(at)
        run.sync()
        run.record(warmup_steps=step, warmup_s=round(time.perf_counter() - t0, 1),
                   graphs_compiled_in_warmup=compiled_graphs() - graphs0, new_graph_steps=new_graph_steps,
                   warmup_cut_short=step - last_new < quiet, steps_for_unseen_target_shapes=extra,
                   compiles=compile_log(log0), dynamo_cache="shared with the models before" if arch_index else "fresh")

        def timed(next_images, steps):
            nonlocal step
            wait = 0.0
            run.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                t_fetch = time.perf_counter()
                images = next_images()
                wait += time.perf_counter() - t_fetch
                out = trainer.step(step, images)
                step += 1
            run.sync()  # the only sync in the window
            elapsed = time.perf_counter() - t0
            img_s = steps * trainer.batch / elapsed
            return dict(img_s=round(img_s, 1), step_ms=round(1000 * elapsed / steps, 2),
                        data_wait_fraction=round(wait / elapsed, 4), loss=float(out["loss"].detach()),
                        mfu=round(mfu(img_s, flops, run.peak_tflops), 4) if run.peak_tflops else None)

        steps, graphs_warm = run.size["timed_steps"], compiled_graphs()
        run.record(device_batch=timed(lambda: device_batch, steps))
        source = batches_forever(train_loader(run, cfg))
        next(source)  # start the loader's epoch thread before the window
        try:
            loader_fed = timed(lambda: next(source), steps)
        finally:
            source.close()
        steps_per_epoch = IN100_TRAIN_IMAGES // trainer.batch
        graphs = compiled_graphs() - graphs0
        run.record(loader_fed=loader_fed, timed_steps=steps, recompiles_after_warmup=compiled_graphs() - graphs_warm,
                   compiles=compile_log(log0), graphs_compiled=graphs, peak_memory_gib=peak_memory_gib(run),
                   peak_memory_above_start_gib=peak_memory_gib(run, memory0),
                   trainer_would_run_uncompiled=graphs >= run.results["meta"]["default_recompile_limit"],
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
    reset_memory_stats(run)
    steps, optim = run.size["short_steps"], optim_config(cfg)
    warmup_steps = round(steps * cfg["optim.warmup_epochs"] / cfg["training.epochs"])  # the config's share
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
    run.sync()
    seconds = time.perf_counter() - t0
    losses, target_std = losses[:done].cpu().tolist(), target_std[:done].cpu().tolist()
    window = max(1, done // 10)
    loss_start, loss_end = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    run.record(arch=cfg["model.arch"], steps=done, steps_asked=steps, loss_start=round(loss_start, 4),
               loss_end=round(loss_end, 4), loss_window_steps=window, loss_every_10=[round(v, 4) for v in losses[::10]],
               target_std_start=round(target_std[0], 4), target_std_end=round(target_std[-1], 4),
               target_std_min=round(min(target_std), 4), target_std_floor=TARGET_STD_FLOOR,
               all_finite=all(map(math.isfinite, losses)), img_s=round(done * trainer.batch / seconds, 1),
               recompiles=compiled_graphs() - graphs0, peak_memory_gib=peak_memory_gib(run),
               passed=done == steps and loss_end < loss_start and min(target_std) > TARGET_STD_FLOOR)


SECTION_FUNCTIONS = {"data": section_data, "loader": section_loader, "copy_race": section_copy_race,
                     "train_vit_small": section_train(0), "short_run": section_short_run,
                     "train_vit_base": section_train(1)}


# ----------------------------------------------------------------------------------------------
# Report


def print_table(results):
    sections = results["sections"]

    def get(path):
        value = sections
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def text(value, spec):
        return "-" if value is None else f"{value:{spec}}" if isinstance(value, (int, float)) else str(value)

    # (label, JSON path, format, target text, test of the value against the target)
    rows = [("loader img/s, uint8 on the host", "loader.uint8_img_s", ",.0f", "", None),
            ("loader img/s, normalised on the device", "loader.to_device_normalised_img_s", ",.0f", "", None)]
    for name, goal in (("train_vit_small", TARGETS["vit_small_img_s"]), ("train_vit_base", TARGETS["vit_base_img_s"])):
        label = get(f"{name}.arch") or name
        rows += [(f"{label} img/s, GPU-resident batch", f"{name}.device_batch.img_s", ",.0f", f">= {goal:,.0f}",
                  lambda v, goal=goal: v >= goal),
                 (f"{label} img/s, fed by the loader", f"{name}.loader_fed.img_s", ",.0f", f">= {goal:,.0f}",
                  lambda v, goal=goal: v >= goal),
                 (f"{label} MFU, fed by the loader", f"{name}.loader_fed.mfu", ".1%", "", None),
                 (f"{label} data-wait", f"{name}.loader_fed.data_wait_fraction", ".2%", "< 2%",
                  lambda v: v < TARGETS["data_wait_fraction"]),
                 (f"{label} graphs compiled in warm-up", f"{name}.graphs_compiled_in_warmup", "d", "", None),
                 (f"{label} graphs compiled after warm-up", f"{name}.recompiles_after_warmup", "d", "0",
                  lambda v: v == 0),
                 (f"{label} peak memory, GiB", f"{name}.peak_memory_gib", ".2f", "", None)]
    rows += [(f"ImageNet-100 x 100 epochs, {get('train_vit_small.arch') or 'vit_small'}, min",
              "train_vit_small.in100_100ep_minutes", ".1f", "<= 40", lambda v: v <= TARGETS["in100_100ep_minutes"]),
             ("copy race: batches whose checksums differ", "copy_race.mismatched_batches", "d", "0", lambda v: v == 0),
             ("copy race: batches checked", "copy_race.steps", "d", ">= 500", None),
             ("copy race: steps the host ran ahead, mean", "copy_race.host_lead_steps_mean", ".1f", "", None),
             ("short run: mean loss, first 10% of steps", "short_run.loss_start", ".4f", "", None),
             ("short run: mean loss, last 10% of steps", "short_run.loss_end", ".4f", "falls", None),
             ("short run: lowest target_std", "short_run.target_std_min", ".4f", f"> {TARGET_STD_FLOOR}",
              lambda v: v > TARGET_STD_FLOOR),
             ("short run passed", "short_run.passed", "", "", None)]
    print(f"\n{results['meta']['device']}, torch {results['meta']['torch']}")
    print(f"{'figure':<46}{'value':>12}  {'target':<10}")
    for label, path, spec, target, meets in rows:
        value = get(path)
        verdict = "" if meets is None or value is None else "meets" if meets(value) else "short"
        print(f"{label:<46}{text(value, spec):>12}  {target:<10}{verdict}")
    for name, entry in sections.items():
        if entry.get("status") != "ok":
            print(f"{name}: {entry.get('status')} {entry.get('error') or entry.get('reason') or ''}")
    sys.stdout.flush()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU-sized toy run of every section (seconds)")
    p.add_argument("--sections", default=",".join(SECTIONS[1:]), help="comma-separated, from " + ",".join(SECTIONS[1:]))
    p.add_argument("--out", default="device_check.json", help="JSON results, rewritten after every section")
    p.add_argument("--budget-s", type=float, default=450.0, help="no section starts that no longer fits in it")
    p.add_argument("--hard-limit-s", type=float, default=0.0, help="watchdog: save and exit 124 (0: budget + 30 s)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 TFLOP/s of a card not in the table")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--work-dir", default="", help="folder for the images and beton (kept, and reused when present)")
    p.add_argument("--num-workers", type=int, default=0, help="loader threads (0 = every core)")
    p.add_argument("--num-images", type=int, default=0, help="images to draw (0: 4000, smoke 64)")
    p.add_argument("--timed-steps", type=int, default=0, help="steps per timed window (0: 50, smoke 3)")
    p.add_argument("--race-steps", type=int, default=0, help="copy-race batches (0: 500, smoke 12)")
    p.add_argument("--short-steps", type=int, default=0, help="short-run steps (0: 300, smoke 16)")
    p.add_argument("--compile-backend", default="", help="torch.compile backend (default inductor, smoke eager)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS[1:])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    args.hard_limit_s = args.hard_limit_s or args.budget_s + 30
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
    run.results["meta"]["default_recompile_limit"] = share_compile_cache()
    run.start_watchdog()
    run.say(f"budget {args.budget_s:.0f} s, hard limit {args.hard_limit_s:.0f} s from the start; writing {args.out}")
    run.run("data", section_data)
    run.describe_device()
    for name in SECTIONS[1:]:
        if name in args.sections.split(","):
            run.run(name, SECTION_FUNCTIONS[name])
    if "loader" in run.kept:
        run.kept["loader"].close()
    with run.lock:
        run.current = None
        run.results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run.save()
    print_table(run.results)
    print(f"wrote {args.out}")
    return 0 if all(e["status"] in ("ok", "skipped") for e in run.results["sections"].values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
