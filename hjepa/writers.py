"""Glue shared by the write_datasets/*.py entry points: config in; beton, manifest and params out.

Each entry point reads its source format (hjepa.sources) and hands the samples to `write_split`;
everything else a writer does (the `cfg` section, the checks on write_path, subsets, the manifest and
params.json beside the beton) lives here, once.
"""
import os
import sys

from hjepa.beton import write_beton
from hjepa.config import config_from_cli, format_config, save_config
from hjepa.errors import UserError


WRITER_READS = ("cfg",)


def writer_config(description, argv):
    """Parse the command line, print the resolved `cfg` section, check write_path is set."""
    cfg = config_from_cli(description, argv, reads=WRITER_READS)
    print("config:\n" + format_config(cfg, ["cfg"]), flush=True)
    if not cfg["cfg.write_path"]:
        raise UserError("no output given: pass --cfg.write_path=<folder>/<name>.beton")
    if not cfg["cfg.write_path"].endswith(".beton"):
        raise UserError(f"cfg.write_path must end in .beton, got '{cfg['cfg.write_path']}'")
    return cfg


def evenly_spaced(samples, subset):
    """`subset` samples spread evenly over the (class-sorted) list, so every class keeps its share;
    -1 or a subset >= len(samples) keeps all."""
    if subset < 0 or subset >= len(samples):
        return samples
    return [samples[i * len(samples) // subset] for i in range(subset)]


def write_split(cfg, samples, *, dataset, class_names, ignored_files=()):
    """Write `samples` (read from cfg.data_dir) with the writer params of `cfg`; save the config as
    <write_path>.params.json. ignored_files: non-image files the reader left out (listed in the manifest)."""
    split, write_path, source = cfg["cfg.split"], cfg["cfg.write_path"], cfg["cfg.data_dir"]
    samples = evenly_spaced(samples, cfg["cfg.subset"])
    print(f"{dataset} {split}: {len(samples)} images in {len(class_names)} classes from {source}", flush=True)
    if ignored_files:
        print(f"note: ignored {len(ignored_files)} files without an image extension (listed in the manifest), "
              f"first: {ignored_files[0]}", file=sys.stderr)
    manifest = write_beton(
        samples, write_path, dataset=dataset, split=split, class_names=class_names,
        source=os.path.abspath(source), short_side=cfg["cfg.short_side"], max_side=cfg["cfg.max_side"],
        jpeg_quality=cfg["cfg.jpeg_quality"], write_mode=cfg["cfg.write_mode"],
        compress_probability=cfg["cfg.compress_probability"], num_workers=cfg["cfg.num_workers"],
        chunk_size=cfg["cfg.chunk_size"], max_bad_fraction=cfg["cfg.max_bad_fraction"],
        ignored_files=ignored_files)
    save_config(cfg, write_path + ".params.json", sections=["cfg"])
    if manifest["num_bad_images"]:
        print(f"skipped {manifest['num_bad_images']} unreadable images (listed in the manifest)")
    print(f"{dataset} {split}: wrote {manifest['num_samples']} images to {write_path}", flush=True)
    return manifest
