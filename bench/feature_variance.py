"""What an encoder's pooled features hold: the shares of their variance that the class and the colour explain.

    python bench/feature_variance.py --beton betons/demo_train.beton --random-init-seeds 0,1 \\
        --out feature_variance.json ablation_demo/runs/*/checkpoint.pt

For every checkpoint (its target encoder, or --encoder=context) and every random-init encoder of the
first checkpoint's architecture, the mean-token features of --beton (the linear probe's input:
`hjepa.probe.extract_features` on the eval loader) are scaled to unit variance per dimension, as the
probe's BatchNorm does, and regressed (least squares) on
- the class (one indicator per class: the fit is each class's mean feature),
- the image's colour: mean RGB of the whole image, of its border band and of its centre
  (`hjepa.probe.colour_regressors`); also on the border and the centre alone.
A share is the fraction of the feature variance such a fit explains (`hjepa.probe.explained_variance`).
On data whose colours are drawn independently of the class, colour is a nuisance: a feature space that
spends most of its variance on it leaves less for the class. On grey images the colour is brightness,
which may well be part of the class (the first printed line says how much). Shares are scored on the
images they were fitted to: K regressors explain about K / (N - 1) by chance. Unlabeled images (STL-10's
unlabeled split) are left out. Checkpoints named
<name>-s<seed>/checkpoint.pt (bench/ablation.py's runs) are also summarised per name, mean ± std over
seeds. Where a checkpoint's probe result lies beside it (bench/ablation.py's probe.json, or
eval/linear_probe.py's probe_<dataset>_<encoder>.json), each share's correlation with its linear top-1
is printed too. Prints a table and writes JSON.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script, this file's siblings import as bench.<module> from the root
    sys.path.insert(0, REPO)

from bench.seed_stats import mean_std_n  # noqa: E402 (after the path set-up)
from hjepa import probe  # noqa: E402
from hjepa.checkpoint import encoder_from_checkpoint, load_training_checkpoint  # noqa: E402
from hjepa.errors import UserError, exit_on_user_error  # noqa: E402
from hjepa.runlog import git_commit  # noqa: E402
from hjepa.vit import build_encoder  # noqa: E402

SHARES = ("class", "colour", "border", "centre")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/feature_variance.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="training checkpoints (train.py's checkpoint.pt)")
    parser.add_argument("--beton", required=True, help="labeled beton whose images are encoded")
    parser.add_argument("--encoder", choices=("target", "context"), default="target")
    parser.add_argument("--random-init-seeds", default="", help="comma-separated seeds of random-init encoders")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--num-workers", type=int, default=0, help="loader threads; 0 = all cores")
    parser.add_argument("--out", default="", help="JSON results file (default: none)")
    args = parser.parse_args(argv)
    try:
        args.random_init_seeds = [int(s) for s in args.random_init_seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--random-init-seeds takes comma-separated integers, not {args.random_init_seeds!r}")
    if not args.checkpoints:
        parser.error("give at least one checkpoint (the random-init encoders take its architecture)")
    return args


def encoders(args):
    """([(name, encoder, probe top-1 or None)] for each checkpoint, then each random-init seed, and the
    image size they read).
    Random-init encoders take the first checkpoint's architecture."""
    first_config, named = None, []
    for path in args.checkpoints:
        ckpt, model_config = load_training_checkpoint(path)
        first_config = first_config or model_config
        if (model_config["image_size"], model_config["patch_size"]) != (first_config["image_size"],
                                                                         first_config["patch_size"]):
            raise UserError(f"{path} was trained at {model_config['image_size']} px with "
                            f"{model_config['patch_size']} px patches, {args.checkpoints[0]} at "
                            f"{first_config['image_size']} / {first_config['patch_size']}: give one resolution")
        name = run_name(path)
        if name in [n for n, *_ in named]:
            raise UserError(f"two checkpoints in folders named {name!r} ({path} is the second): their rows "
                            "would be counted as one variant's seeds; give each run's folder once")
        named.append((name, encoder_from_checkpoint(ckpt, args.encoder, path), probe_top1(path, args.encoder)))
    for seed in args.random_init_seeds:
        torch.manual_seed(seed)
        named.append((f"random init-s{seed}", build_encoder(
            first_config["arch"], patch_size=first_config["patch_size"], image_size=first_config["image_size"]), None))
    return named, first_config["image_size"]


def run_name(path):
    """A checkpoint's row name: its folder's name (bench/ablation.py names them <variant>-s<seed>)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path


def probe_top1(checkpoint, encoder):
    """Linear top-1 of the mean-token probe saved beside a checkpoint (bench/ablation.py's probe.json, or
    eval/linear_probe.py's probe_<dataset>_<encoder>.json), or None when there is not exactly one."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    found = [name for name in os.listdir(folder) if name == "probe.json"
             or (name.startswith("probe_") and name.endswith(f"_{encoder}.json"))]
    if len(found) != 1:
        return None
    with open(os.path.join(folder, found[0])) as f:
        result = json.load(f)
    return result["top1"] if result.get("encoder") == encoder and result.get("last_k_blocks", 1) == 1 else None


def correlations(rows):
    """{share: Pearson correlation with the probe's top-1} over the rows that have one (at least 3);
    None for a share or a top-1 that does not vary over them."""
    scored = [row for row in rows if row.get("top1") is not None]
    if len(scored) < 3:
        return {}
    top1 = np.array([row["top1"] for row in scored])
    result = {"rows": len(scored)}
    for key in SHARES:
        values = np.array([row[key] for row in scored])
        varies = np.ptp(values) > 0 and np.ptp(top1) > 0
        result[key] = float(np.corrcoef(values, top1)[0, 1]) if varies else None
    return result


def group_of(name):
    """'<variant>' of '<variant>-s<seed>', else None."""
    match = re.fullmatch(r"(.+)-s\d+", name)
    return match.group(1) if match else None


def shares(features, labels, colours):
    """{share name: fraction of the feature variance explained} (see the module docstring)."""
    return {"class": probe.explained_variance(features, probe.class_indicators(labels)),
            "colour": probe.explained_variance(features, colours),
            "border": probe.explained_variance(features, colours[:, 3:6]),
            "centre": probe.explained_variance(features, colours[:, 6:9])}


def image_colours(loader):
    """(colour regressors (N, 9), labels (N,)) of every image of the eval loader, in its order."""
    colours, labels = [], []
    for images, batch_labels, *_ in loader:
        colours.append(probe.colour_regressors(images))
        labels.append(batch_labels.flatten().clone())  # FFCV reuses its label buffer for later batches
    return torch.cat(colours), torch.cat(labels)


def summarise(rows):
    """{group: {share: [mean, std]}} over the rows named <group>-s<seed> (bench/seed_stats.py's
    mean_std_n: sample std, 0 for a single seed)."""
    groups = {}
    for row in rows:
        group = group_of(row["name"])
        if group is not None:
            groups.setdefault(group, []).append(row)
    return {group: {key: list(mean_std_n([r[key] for r in members])[:2]) for key in SHARES} | {"seeds": len(members)}
            for group, members in groups.items()}


def print_table(rows, groups, colour_by_class):
    labels = {group: f"{group} ({stats['seeds']})" for group, stats in groups.items()}
    width = max(12, *(len(r["name"]) for r in rows), *(len(label) for label in labels.values()))
    print(f"\nclass explains {colour_by_class:.3f} of the images' colour variance (by chance alone: about "
          "classes / (images - 1))")
    print(f"{'encoder':<{width}}  " + "  ".join(f"{k:>13}" for k in SHARES) + f"{'probe top-1':>13}")
    for row in rows:
        top1 = "-" if row["top1"] is None else f"{row['top1']:.1f}"
        print(f"{row['name']:<{width}}  " + "  ".join(f"{row[k]:>13.3f}" for k in SHARES) + f"{top1:>13}")
    if groups:
        print(f"\n{'mean ± std':<{width}}  " + "  ".join(f"{k:>13}" for k in SHARES))
        for group, stats in groups.items():
            print(f"{labels[group]:<{width}}  "
                  + "  ".join(f"{stats[k][0]:>6.3f} ± {stats[k][1]:.3f}" for k in SHARES))


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.beton):
        raise UserError(f"no beton at {args.beton}")
    named_encoders, image_size = encoders(args)  # every checkpoint read before ffcv's import (seconds of JIT)
    from hjepa.loaders import build_eval_loader

    rows = []
    with build_eval_loader(args.beton, batch_size=args.batch_size, num_workers=args.num_workers,
                           image_size=image_size) as loader:
        colours, labels = image_colours(loader)
        labeled = labels != probe.UNLABELED
        if labeled.sum() < 2:
            raise UserError(f"{args.beton} holds fewer than 2 labeled images: the class shares need labels")
        colour_by_class = probe.explained_variance(colours[labeled, :3], probe.class_indicators(labels[labeled]))
        for name, encoder, top1 in named_encoders:
            features, feature_labels = probe.extract_features(encoder.eval(), loader, device="cpu",
                                                              dtype=torch.float32, progress=False)
            if not torch.equal(feature_labels.long(), labels.long()):
                raise RuntimeError("the eval loader's second pass gave another order")  # a bug, not a user error
            rows.append({"name": name, **shares(features[labeled], labels[labeled], colours[labeled]), "top1": top1})
            print(f"{name}: " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in SHARES), flush=True)
    groups = summarise(rows)
    print_table(rows, groups, colour_by_class)
    correlation = correlations(rows)
    if correlation:
        print(f"\ncorrelation with the probe's linear top-1 over the {correlation['rows']} checkpoints whose "
              "probe result lies beside them: "
              + ", ".join(f"{k} " + ("-" if correlation[k] is None else f"{correlation[k]:+.2f}") for k in SHARES))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"beton": os.path.abspath(args.beton), "encoder": args.encoder, "commit": git_commit(REPO),
                       "checkpoints": [os.path.abspath(p) for p in args.checkpoints],
                       "random_init_seeds": args.random_init_seeds, "num_images": int(labeled.sum()),
                       "colour_explained_by_class": colour_by_class, "rows": rows, "groups": groups,
                       "correlation_with_top1": correlation}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
