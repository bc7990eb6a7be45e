"""Linear-probe and k-NN top-1 of a frozen H-JEPA encoder, on any beton the writers produce.

    python eval/linear_probe.py --eval.checkpoint=runs/RUN/checkpoint.pt \
        --eval.train_dataset=betons/imagenet100_train.beton --eval.val_dataset=betons/imagenet100_val.beton
    python eval/linear_probe.py --eval.random_init=1 --model.arch=vit_small --data.image_size=224 ...
    python eval/linear_probe.py --eval.pixels=1 --data.image_size=64 ...   # raw pixels, no encoder
    python eval/linear_probe.py --eval.checkpoint=... --eval.tokens=grid ...   # every token, not their mean
    python -m eval.linear_probe ...   # the same, from the repository root

Features (average-pooled tokens of the target encoder, or --eval.encoder=context) are extracted once
through the eval FFCV pipeline and cached in --eval.cache_dir (default <checkpoint dir>/features);
then a BatchNorm1d(affine=False)+Linear probe is trained on them and a weighted k-NN is scored.
With --eval.tokens=grid the features are the whole token grid, flattened (tokens x width), to measure
what the average pooling discards. Prints a table and writes JSON to --eval.out (default
<checkpoint dir>/probe_<dataset>_<encoder>.json, probe_<dataset>_<encoder>_grid.json for the grid).
"""
import datetime
import json
import os
import time

import torch

from hjepa import probe
from hjepa.beton import read_manifest
from hjepa.checkpoint import encoder_from_checkpoint, load_training_checkpoint
from hjepa.config import config_as_dict, config_from_cli, format_config
from hjepa.errors import UserError, exit_on_user_error
from hjepa.vit import build_encoder

# Bump when extraction changes what a cached feature means. 2: labels copied out of FFCV's reused
# buffers (version-1 caches hold wrong labels).
CACHE_VERSION = 2
READS = ("eval", "model.arch", "model.patch_size", "data.image_size", "data.in_memory", "logging.progress")


FEATURE_BYTES = 8 * 2**30  # raw-pixel or token-grid features of both betons held in memory at most (float32)


def encoder_spec(cfg):
    """(checkpoint dict or None, model_config) for the encoder to probe."""
    if cfg["eval.pixels"]:
        if cfg["eval.checkpoint"] or cfg["eval.random_init"]:
            raise UserError("eval.pixels probes the images themselves: give it without eval.checkpoint and "
                            "eval.random_init")
        if cfg["eval.last_k_blocks"] != 1:
            raise UserError("eval.pixels has no blocks: eval.last_k_blocks must be 1")
        if cfg["eval.tokens"] == "grid":
            raise UserError("eval.pixels has no tokens to keep apart: eval.tokens must be mean (the pixels are "
                            "already flattened)")
        return None, {"arch": "pixels", "patch_size": None, "image_size": cfg["data.image_size"]}
    if cfg["eval.checkpoint"]:
        return load_training_checkpoint(cfg["eval.checkpoint"])
    if not cfg["eval.random_init"]:
        raise UserError("eval.checkpoint is empty: give --eval.checkpoint=PATH, or --eval.random_init=1 "
                        "for an untrained encoder of --model.arch")
    return None, {"arch": cfg["model.arch"], "patch_size": cfg["model.patch_size"],
                  "image_size": cfg["data.image_size"]}


def build_frozen_encoder(cfg, ckpt, model_config, image_size):
    """The encoder to probe, in eval mode; random weights seeded by eval.seed when random_init."""
    torch.manual_seed(cfg["eval.seed"])
    if cfg["eval.pixels"]:
        return probe.Pixels()
    if cfg["eval.random_init"]:
        encoder = build_encoder(model_config["arch"], patch_size=model_config["patch_size"], image_size=image_size)
    else:
        encoder = encoder_from_checkpoint(ckpt, cfg["eval.encoder"], cfg["eval.checkpoint"], image_size=image_size)
    return encoder.eval().requires_grad_(False)


def dataset_identity(beton_path, manifest):
    """What the cached features depend on in the data: the beton's bytes (checksum from its manifest)."""
    return {"checksum": manifest["checksum"]["hex"], "num_samples": manifest["num_samples"]}


def features_for(cfg, beton_path, manifest, encoder, *, encoder_key, cache_dir, image_size, device, dtype):
    """(features, labels, cache_hit, seconds) of one beton, from the cache when possible."""
    key = {**encoder_key, "dataset": dataset_identity(beton_path, manifest)}
    name = f"{manifest['dataset']}_{manifest['split']}_{encoder_key['encoder']}".replace("+", "-")
    cache_path = probe.feature_cache_path(cache_dir, key, name=name)

    def extract():
        from hjepa.loaders import build_eval_loader  # imports ffcv (seconds of JIT): only when extracting

        with build_eval_loader(beton_path, batch_size=cfg["eval.extract_batch_size"],
                               num_workers=cfg["eval.num_workers"], image_size=image_size,
                               in_memory=cfg["data.in_memory"]) as loader:
            return probe.extract_features(encoder, loader, device=device, dtype=dtype,
                                          last_k_blocks=cfg["eval.last_k_blocks"], tokens=cfg["eval.tokens"],
                                          progress=cfg["logging.progress"])

    start = time.perf_counter()
    features, labels, hit = probe.cached_features(cache_path, key, extract)
    seconds = time.perf_counter() - start
    print(f"{'cached' if hit else 'extracted'} {tuple(features.shape)} features of {beton_path} "
          f"({seconds:.1f} s) {'from' if hit else 'into'} {cache_path}", flush=True)
    return features, labels, hit, seconds


def default_path(cfg, folder_name):
    """Next to the checkpoint, or in the current folder for a random-init probe without one."""
    checkpoint = cfg["eval.checkpoint"]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)) if checkpoint else os.getcwd(), folder_name)


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv, reads=READS)
    print(format_config(cfg, READS), flush=True)
    for key in ("eval.train_dataset", "eval.val_dataset"):
        if not cfg[key]:
            raise UserError(f"{key} is empty: give --{key}=PATH.beton")
    # The checkpoint first: a wrong path fails before read_manifest pays ffcv's import.
    ckpt, model_config = encoder_spec(cfg)
    image_size = cfg["eval.image_size"] or model_config["image_size"]
    encoder = build_frozen_encoder(cfg, ckpt, model_config, image_size)
    if cfg["eval.last_k_blocks"] > encoder.depth:
        raise UserError(f"eval.last_k_blocks={cfg['eval.last_k_blocks']} exceeds the encoder's {encoder.depth} blocks")
    train_manifest = read_manifest(cfg["eval.train_dataset"])
    val_manifest = read_manifest(cfg["eval.val_dataset"])
    if train_manifest["dataset"] != val_manifest["dataset"]:
        raise UserError(f"train beton is {train_manifest['dataset']} but val beton is {val_manifest['dataset']}: "
                        "a probe's classes only mean something within one dataset")
    grid = cfg["eval.tokens"] == "grid"
    if grid and cfg["eval.last_k_blocks"] > 1:
        raise UserError("eval.tokens=grid reads the last block's tokens: eval.last_k_blocks must be 1")
    if cfg["eval.pixels"] or grid:
        per_image = (3 * image_size ** 2 if cfg["eval.pixels"]
                     else (image_size // model_config["patch_size"]) ** 2 * encoder.embed_dim)
        feature_bytes = 4 * per_image * (train_manifest["num_samples"] + val_manifest["num_samples"])
        if feature_bytes > FEATURE_BYTES:
            what = "eval.pixels" if cfg["eval.pixels"] else "eval.tokens=grid"
            raise UserError(f"{what} at {image_size} px would hold {feature_bytes / 2**30:.0f} GiB of features "
                            f"(at most {FEATURE_BYTES // 2**30}): give a smaller --eval.image_size")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder.to(device)
    encoder_name = "pixels" if cfg["eval.pixels"] else "random" if cfg["eval.random_init"] else cfg["eval.encoder"]

    # The encoder's own weights (content hash) identify it exactly, random init and seed included,
    # so a copied or re-saved checkpoint with the same weights reuses its features.
    encoder_key = {"version": CACHE_VERSION, "encoder": encoder_name, "arch": model_config["arch"],
                   "patch_size": model_config["patch_size"], "image_size": image_size,
                   "last_k_blocks": cfg["eval.last_k_blocks"], "random_init": cfg["eval.random_init"],
                   "seed": cfg["eval.seed"] if cfg["eval.random_init"] else None, "dtype": str(dtype),
                   "weights": probe.state_dict_digest(encoder.state_dict()),
                   **({"tokens": "grid"} if grid else {})}  # absent for the mean: earlier caches stay valid
    cache_dir = cfg["eval.cache_dir"] or default_path(cfg, "features")
    common = dict(encoder_key=encoder_key, cache_dir=cache_dir, image_size=image_size, device=device, dtype=dtype)
    train_feats, train_labels, train_hit, train_s = features_for(
        cfg, cfg["eval.train_dataset"], train_manifest, encoder, **common)
    val_feats, val_labels, val_hit, val_s = features_for(cfg, cfg["eval.val_dataset"], val_manifest, encoder, **common)
    del encoder

    num_train = int((train_labels != probe.UNLABELED).sum())
    num_val = int((val_labels != probe.UNLABELED).sum())
    if num_train < 2 or num_val < 1:
        raise UserError(f"need labeled samples to probe: {num_train} in {cfg['eval.train_dataset']}, "
                        f"{num_val} in {cfg['eval.val_dataset']} (unlabeled splits cannot be probed)")
    num_classes = max(len(train_manifest.get("class_names") or []),
                      int(torch.cat([train_labels, val_labels]).max()) + 1)

    start = time.perf_counter()
    probe_result = probe.train_linear_probe(
        train_feats, train_labels, val_feats, val_labels, epochs=cfg["eval.epochs"], lr=cfg["eval.lr"],
        weight_decay=cfg["eval.weight_decay"], batch_size=cfg["eval.batch_size"], seed=cfg["eval.seed"],
        device=device, progress=cfg["logging.progress"], num_classes=num_classes, min_steps=cfg["eval.min_steps"])
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    knn = probe.knn_top1(train_feats, train_labels, val_feats, val_labels, k=cfg["eval.knn_k"],
                         temperature=cfg["eval.knn_temperature"], num_classes=num_classes, device=device)
    knn_s = time.perf_counter() - start

    result = {
        **probe_result, "knn_top1": knn, "encoder": encoder_name, "dataset": train_manifest["dataset"],
        "num_train": num_train, "num_val": num_val, "num_classes": num_classes,
        "feature_dim": train_feats.shape[1], "checkpoint": cfg["eval.checkpoint"] or None,
        "checkpoint_epoch": ckpt.get("epoch") if ckpt else None, "checkpoint_step": ckpt.get("step") if ckpt else None,
        "arch": model_config["arch"], "patch_size": model_config["patch_size"], "image_size": image_size,
        "last_k_blocks": cfg["eval.last_k_blocks"], "tokens": cfg["eval.tokens"],
        "train_dataset": cfg["eval.train_dataset"],
        "val_dataset": cfg["eval.val_dataset"], "min_steps": cfg["eval.min_steps"], "lr": cfg["eval.lr"],
        "weight_decay": cfg["eval.weight_decay"], "batch_size": cfg["eval.batch_size"], "seed": cfg["eval.seed"],
        "knn_k": cfg["eval.knn_k"], "knn_temperature": cfg["eval.knn_temperature"], "device": str(device),
        "cache_hits": {"train": train_hit, "val": val_hit},
        "timings_s": {"train_features": round(train_s, 2), "val_features": round(val_s, 2),
                      "probe": round(probe_s, 2), "knn": round(knn_s, 2)},
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": config_as_dict(cfg, READS),
    }
    suffix = "_grid" if grid else ""
    out = cfg["eval.out"] or default_path(cfg, f"probe_{result['dataset']}_{encoder_name}{suffix}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)

    width = max(12, len(result["dataset"]) + 2)  # fashion_mnist, imagenet100+stl10, ...
    print(f"\n{'dataset':<{width}}{'encoder':<9}{'arch':<11}{'train':>8}{'val':>7}{'top1':>8}{'top5':>8}"
          f"{'knn top1':>10}")
    print(f"{result['dataset']:<{width}}{encoder_name:<9}{result['arch']:<11}{num_train:>8}{num_val:>7}"
          f"{result['top1']:>8.2f}{result['top5']:>8.2f}{knn:>10.2f}")
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
