"""Write ImageNet-100 (the CMC 100-class subset of ImageNet-1k) to a .beton.

  python write_datasets/imagenet100.py --cfg.data_dir=/data/imagenet --cfg.split=train \\
      --cfg.write_path=betons/imagenet100_train.beton

cfg.data_dir is the ImageNet-1k folder that contains train/<wnid>/*.JPEG and val/, either as
val/<wnid>/*.JPEG or as flat val/*.JPEG with LOC_val_solution.csv (inside val/, in data_dir, or up to
three folders above it, as in Kaggle's ILSVRC/Data/CLS-LOC copy). A tree that already holds only the
100 classes works too. Only the 100 wnids of hjepa/imagenet100_classes.txt are kept; label = position
in that list. On real data: 126,689 train and 5,000 val images; a tree with all 100 classes that
holds another number gets a warning. Missing classes stop the run (exit 1, listing them) unless
--cfg.allow_missing_classes=1. Only files with image extensions are samples. Stored size: shorter
side cfg.short_side (default 256, never enlarged). ImageNet is never downloaded.
Beside the beton: <name>.json (manifest) and <name>.beton.params.json (this config).
"""
import sys

from hjepa.errors import exit_on_user_error
from hjepa.sources import IMAGENET100_SPLIT_SIZES, imagenet100_class_list, imagenet_samples
from hjepa.writers import write_split, writer_config


@exit_on_user_error
def main(argv=None):
    cfg = writer_config(__doc__, argv)
    samples, class_names, info = imagenet_samples(
        cfg["cfg.data_dir"], cfg["cfg.split"], class_list=imagenet100_class_list(),
        allow_missing_classes=cfg["cfg.allow_missing_classes"])
    print(f"{len(info['present'])} of 100 classes present; {len(info['dropped_classes'])} other classes "
          "dropped", flush=True)
    expected = IMAGENET100_SPLIT_SIZES[cfg["cfg.split"]]
    if not info["missing"] and len(samples) != expected:
        print(f"warning: {len(samples):,} {cfg['cfg.split']} images in the 100 classes, ImageNet-100 has "
              f"{expected:,}: an incomplete or altered copy of ImageNet?", file=sys.stderr)
    return write_split(cfg, samples, dataset="imagenet100", class_names=class_names,
                       ignored_files=info["ignored_files"])


if __name__ == "__main__":
    main()
