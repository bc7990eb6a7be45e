"""bench/device_check.py's variants section: ViT-S alternatives timed as train_vit_small times them."""
import dataclasses
import os
import time

import torch

from bench.device_trainer import IN100_TRAIN_IMAGES, Trainer, train_loader
from hjepa.compile_stats import compilation_records, compile_log, compiled_graphs, cudagraph_skips
from hjepa.loaders import build_train_loader
from hjepa.masks import sample_masks
from hjepa.sections import data_config
from hjepa.step_timing import loader_fed_window, peak_memory_gib, reset_memory_stats, sync, timed_window


def fewer_workers(workers):
    """Loader thread counts to try besides `workers`: the trainer's own thread needs a core too."""
    return sorted({max(1, workers - 4), max(1, workers // 2)} - {workers}, reverse=True)


def section_variants(run):
    """ViT-S alternatives, timed as train_vit_small times them: the loader-fed window at fewer loader
    threads, with ImageNet-100-long epochs and with FFCV's per-epoch buffer allocation, then a trainer
    compiled in the other hardware.compile_mode (reduce-overhead: CUDA graphs; inductor only: with
    --smoke's eager backend no mode is applied)."""
    trainer = run.kept.pop("vit_small", None)
    if trainer is None:
        raise RuntimeError("no ViT-S trainer: train_vit_small did not run")
    cfg, steps, first = run.config(run.size["archs"][0]), run.size["timed_steps"], 200_000
    trainer.optimizer = trainer.new_optimizer()
    workers = run.args.num_workers or os.cpu_count()
    by_workers = {workers: loader_fed_window(trainer, train_loader(run, cfg), steps, first, run.peak_tflops)}
    for count in fewer_workers(workers):
        loader = build_train_loader(dataclasses.replace(data_config(cfg), train_dataset=run.kept["beton"],
                                                        num_workers=count, in_memory=True, order="random", seed=0))
        try:
            by_workers[count] = loader_fed_window(trainer, loader, steps, first, run.peak_tflops)
        finally:
            loader.close()
    run.record(loader_fed_by_workers={str(count): window for count, window in by_workers.items()})
    # The generated beton holds 4,000 images, 15 batches of 256: FFCV starts an epoch every 15 steps (a
    # new thread and first batch), where ImageNet-100 starts one every 494. An epoch as long as
    # ImageNet-100's, drawn with repetition, shows what that costs; a loader given back FFCV's own
    # allocation (fresh output buffers, pinned, at every epoch start) shows what allocating once saves.
    long_epochs = dict(epoch_samples=IN100_TRAIN_IMAGES)
    for name, overrides, fresh_buffers in (("loader_fed_long_epochs", long_epochs, False),
                                           ("loader_fed_fresh_buffers_each_epoch", {}, True)):
        loader = build_train_loader(dataclasses.replace(data_config(cfg), train_dataset=run.kept["beton"],
                                                        num_workers=workers, in_memory=True, order="random", seed=0,
                                                        **overrides))
        if fresh_buffers:
            del loader.loader.graph.allocate_memory  # hjepa.loaders' allocate-once wrapper: FFCV's method again
        try:
            window = loader_fed_window(trainer, loader, steps, first, run.peak_tflops)
        finally:
            loader.close()
        run.record(**{name: dict(num_workers=workers, **overrides, **window)})
    configured = trainer.compile_mode
    del trainer

    torch._dynamo.reset()
    memory0 = reset_memory_stats(run.device)
    other = "default" if configured == "reduce-overhead" else "reduce-overhead"
    trainer = Trainer(run, run.config(run.size["archs"][0], {"hardware.compile_mode": other}))
    log0, graphs0, skips0 = len(compilation_records()), compiled_graphs(), cudagraph_skips()
    batch, warmup = run.kept["device_batch"], run.size["warmup_steps"]
    t0 = time.perf_counter()
    for step in range(warmup):
        trainer.step(step, batch)
    sync(run.device)
    warmup_s, graphs_warm = time.perf_counter() - t0, compiled_graphs()
    device_batch = timed_window(trainer, lambda: batch, steps, warmup, run.peak_tflops)
    loader_fed = loader_fed_window(trainer, train_loader(run, cfg), steps, warmup + steps, run.peak_tflops)
    run.record(other_compile_mode=dict(compile_mode=other, applied=run.size["compile_backend"] == "inductor",
                                       warmup_steps=warmup, warmup_s=round(warmup_s, 1),
                                       graphs_compiled_in_warmup=graphs_warm - graphs0,
                                       recompiles_after_warmup=compiled_graphs() - graphs_warm,
                                       compiles=compile_log(log0), cudagraph_skips=cudagraph_skips() - skips0,
                                       device_batch=device_batch, loader_fed=loader_fed,
                                       peak_memory_above_start_gib=peak_memory_gib(run.device, memory0)))
    del trainer
    run.record(exact_target_blocks=exact_target_blocks(run, cfg))


def exact_target_blocks(run, cfg):
    """The configured ViT-S trainer with target blocks cut to the batch's real size (hjepa.masks.unpadded,
    the token count marked dynamic), timed on the GPU-resident batch like train_vit_small's padded blocks:
    with the default masks 5% fewer FLOPs. Returns the figures, or the error: torch 2.11's inductor
    generated code for this graph that failed at its first run, by its look a slice of a mix-order
    reduction's workspace whose dynamic size it printed without brackets (README "GPU figures").
    After an error, and when the budget still leaves train_vit_base its reserve, it tries once
    more with inductor's mix-order reductions off (`without_mix_order_reduction`): a workaround whose
    figures compare with the padded blocks' only if it, too, runs faster."""
    result = _time_exact_target_blocks(run, cfg)
    reserve = run.size["min_seconds"]["train_vit_base"] + 60  # one more compile and window
    if "error" in result and run.budget_s - run.elapsed() > reserve:
        import torch._inductor.config as inductor_config
        with inductor_config.patch({"triton.mix_order_reduction": False}):
            result["without_mix_order_reduction"] = _time_exact_target_blocks(run, cfg)
    return result


def _time_exact_target_blocks(run, cfg):
    """Warm-up runs one step of every block size the draws make (CUDA graphs are recorded per size), so the
    timed window records none."""
    torch._dynamo.reset()
    try:
        trainer = Trainer(run, cfg, exact_targets=True)
        sizes = {}
        for step in range(3000):  # the block size is drawn per step, before and independently of the images
            masks = sample_masks(trainer.masking, batch_size=1, grid_size=trainer.grid, seed=0, step=step)
            sizes.setdefault(masks.tgt_shape, step)
        graphs0, batch, t0 = compiled_graphs(), run.kept["device_batch"], time.perf_counter()
        warmup = sorted(sizes.values())
        for step in warmup:
            trainer.step(step, batch)
        sync(run.device)
        warmup_s, graphs_warm = time.perf_counter() - t0, compiled_graphs()
        window = timed_window(trainer, lambda: batch, run.size["timed_steps"], 3000)
        return dict(block_sizes=len(sizes), warmup_steps=len(warmup), warmup_s=round(warmup_s, 1),
                    graphs_compiled_in_warmup=graphs_warm - graphs0,
                    recompiles_after_warmup=compiled_graphs() - graphs_warm, device_batch=window)
    except Exception as e:  # a variant: its failure is a finding, the section's other figures stand
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}")
