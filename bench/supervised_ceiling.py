"""The probed architecture trained with labels: the supervised ceiling beside the random-init floor.

    python bench/supervised_ceiling.py --config rn_configs/cpu_demo.yaml --seeds 0,1,2 \\
        --train betons/fmnist_train.beton --val betons/fmnist_val.beton --out supervised_fmnist

A self-supervised recipe's linear probe reads the mean token of its encoder; this trains the same
encoder (the config's model.arch, patch_size, data.image_size) from scratch with cross-entropy through
a linear layer on exactly that feature (the final norm's tokens, averaged), on the same train loader
(the config's random-resized crops and flips, data.seed = seed), for the config's number of epochs
(--epochs to change), AdamW with the config's warmup and cosine learning rate (--lr per 256 images,
default the config's optim.lr), a constant --weight-decay on matrices and --label-smoothing, as DeiT
trains ViTs. Per seed it then probes that encoder with `eval/linear_probe.py` (a fresh
BatchNorm + linear probe and 20-NN on the frozen features, the ablation's probe) and a random-init
encoder of the same architecture beside it (bench/ablation.py's baseline), so a probe gain can be read
against both ends: what no training gives and what labels give in the same budget.

Every seed is a checkpoint in <out>/runs/supervised-s<seed> (train.py's format, the trained encoder as
both context and target encoder, so every eval tool reads it). <out>/results.json is rewritten after
each finished step: a rerun skips what is recorded (and refuses other settings); a seed cut off
mid-training starts again (one run is minutes). Unlabeled images (STL-10's) are left out of the loss.
Prints mean ± std over seeds of the supervised head's own val top-1, the probe's linear and k-NN
top-1; writes results.json.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script, this file's siblings import as bench.<module> from the root
    sys.path.insert(0, REPO)

from bench import ablation, seed_stats  # noqa: E402 (after the path set-up)
from hjepa import schedules  # noqa: E402
from hjepa.beton import read_manifest  # noqa: E402
from hjepa.checkpoint import save_checkpoint  # noqa: E402
from hjepa.config import config_as_dict, load_config  # noqa: E402
from hjepa.errors import UserError, exit_on_user_error  # noqa: E402
from hjepa.model import weight_decay_groups  # noqa: E402
from hjepa.probe import UNLABELED  # noqa: E402
from hjepa.runlog import cpu_model, git_commit  # noqa: E402
from hjepa.sections import data_config, model_config, optim_config  # noqa: E402
from hjepa.vit import build_encoder  # noqa: E402

SUPERVISED = "supervised"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/supervised_ceiling.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the training config whose encoder, data and schedule to use")
    parser.add_argument("--train", required=True, help="labeled training beton (training and probe)")
    parser.add_argument("--val", required=True, help="labeled validation beton (scores and probe)")
    parser.add_argument("--out", required=True, help="folder: runs/, results.json")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: the config's)")
    parser.add_argument("--lr", type=float, default=0.0, help="peak learning rate per 256 images (default: the config's)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices (DeiT: 0.05)")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (DeiT: 0.1)")
    parser.add_argument("--set", default="", metavar="OVERRIDES",
                        help="config overrides, e.g. --set='--data.crop_scale=0.5,1.0' (recorded settings)")
    parser.add_argument("--probe-set", default="", metavar="OVERRIDES", help="overrides for every probe")
    parser.add_argument("--speed-set", default="", metavar="OVERRIDES",
                        help="overrides that change speed, not results (e.g. '--hardware.num_threads=1 "
                             "--data.num_workers=1 --eval.num_workers=1'); not part of the recorded settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, not {args.seeds!r}") from None
    if not args.seeds:
        raise UserError("--seeds is empty")
    for path in (args.config, args.train, args.val):
        if not os.path.isfile(path):
            raise UserError(f"file not found: {path}")
    for name in ("config", "train", "val", "out"):  # probes run from the repository root
        setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


class MeanTokenClassifier(nn.Module):
    """An encoder and a linear layer on the mean of its final normed tokens: the linear probe's feature."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # every class equally likely at step 0
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        return self.head(self.encoder(images).mean(dim=1))


def learning_rates(optim, *, steps, warmup_steps, peak_lr):
    """The per-step learning rate: hjepa.schedules' warmup and cosine, from the config's optim section."""
    return [schedules.learning_rate(step, total_steps=steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                                    warmup_start_lr=peak_lr * optim.warmup_start_factor, min_lr=optim.min_lr)
            for step in range(steps)]


def train_supervised(cfg, *, seed, epochs, lr, weight_decay, label_smoothing, num_classes, progress):
    """(classifier, {"steps", "final_loss", "train_top1"}) after `epochs` of cross-entropy training."""
    from tqdm import tqdm

    from hjepa.loaders import build_train_loader

    torch.manual_seed(seed)
    model_cfg, optim = model_config(cfg), optim_config(cfg)
    encoder = build_encoder(model_cfg.arch, patch_size=model_cfg.patch_size, image_size=model_cfg.image_size,
                            drop_path=model_cfg.drop_path)
    model = MeanTokenClassifier(encoder, num_classes).train()
    data = data_config(cfg)
    data = dataclasses.replace(data, seed=seed)
    optimizer = torch.optim.AdamW(weight_decay_groups(model.named_parameters(), weight_decay), lr=lr,
                                  betas=(optim.beta1, optim.beta2))
    with build_train_loader(data, output="float32") as loader:
        steps_per_epoch = len(loader)
        steps = epochs * steps_per_epoch
        rates = learning_rates(optim, steps=steps, warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
                               peak_lr=dataclasses.replace(optim, lr=lr).peak_lr(data.batch_size))
        step, loss = 0, torch.tensor(float("nan"))
        bar = tqdm(total=steps, desc=f"supervised seed {seed}", unit="step", disable=not progress,
                   dynamic_ncols=True)
        for epoch in range(epochs):
            correct = seen = 0  # the last epoch's training accuracy (augmented images)
            for images, labels, _ in loader.epoch(epoch):
                for group in optimizer.param_groups:
                    group["lr"] = rates[step]
                logits = model(images)  # float32, normalised by the loader's threads
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, ignore_index=UNLABELED)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                correct += int((logits.argmax(dim=1) == labels).sum())  # UNLABELED never matches
                seen += int((labels != UNLABELED).sum())
                step += 1
                bar.update(1)
            loss = loss.detach()
            if not math.isfinite(float(loss)):
                raise UserError(f"supervised training diverged at epoch {epoch} (loss {float(loss)}): lower --lr")
            bar.set_postfix_str(f"loss {float(loss):.3f}, train top-1 {100.0 * correct / max(seen, 1):.1f}")
        bar.close()
    return model.eval(), {"steps": step, "final_loss": float(loss), "train_top1": 100.0 * correct / max(seen, 1)}


@torch.inference_mode()
def head_top1(model, val_beton, *, image_size, num_workers):
    """Top-1 (percent) of the trained classifier itself on the eval pipeline's centre crops."""
    from hjepa.loaders import build_eval_loader

    correct = seen = 0
    with build_eval_loader(val_beton, batch_size=250, num_workers=num_workers, image_size=image_size,
                           output="float32") as loader:
        for images, labels, _ in loader:
            correct += int((model(images).argmax(dim=1) == labels).sum())
            seen += len(labels)
    return 100.0 * correct / seen


def save_encoder(path, model, cfg, record):
    """train.py's checkpoint format with the supervised encoder as both encoders (eval tools read either)."""
    state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    save_checkpoint({"model_config": model_config(cfg).as_record(), "context_encoder": state,
                     "target_encoder": state, "epoch": record["epochs"], "step": record["steps"],
                     "config": config_as_dict(cfg), "objective": "supervised cross-entropy (bench/supervised_ceiling.py)"},
                    path)


def run_seed(seed, *, args, cfg, settings, num_classes, runs_dir):
    """Train and probe the supervised encoder of one seed; return its record."""
    folder = os.path.join(runs_dir, ablation.run_folder_name(SUPERVISED, seed))
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    model, history = train_supervised(cfg, seed=seed, epochs=settings["epochs"], lr=settings["lr"],
                                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                                      num_classes=num_classes, progress=not args.no_progress)
    train_s = time.perf_counter() - start
    record = {"seed": seed, "train_s": train_s, "epochs": settings["epochs"], **history,
              "head_top1": head_top1(model, args.val, image_size=cfg["data.image_size"],
                                     num_workers=cfg["data.num_workers"])}
    checkpoint = os.path.join(folder, "checkpoint.pt")
    save_encoder(checkpoint, model, cfg, record)
    probe_json = os.path.join(folder, "probe.json")
    record["probe_s"] = ablation.run_logged(
        ["eval/linear_probe.py", f"--eval.checkpoint={checkpoint}", f"--eval.train_dataset={args.train}",
         f"--eval.val_dataset={args.val}", f"--eval.seed={seed}", f"--eval.out={probe_json}",
         "--logging.progress=0", *args.probe_set.split(), *args.speed_set.split()],
        os.path.join(folder, "probe.log"))
    with open(probe_json) as f:
        probe_result = json.load(f)
    record.update(top1=probe_result["top1"], knn_top1=probe_result["knn_top1"])
    return record


def summary_table(runs):
    """{name: {metric: (mean, std, n)}} of the random-init and supervised records, seeds pooled."""
    table = seed_stats.summarize(runs, [ablation.RANDOM_INIT, SUPERVISED])
    heads = [r["head_top1"] for k, r in runs.items() if k.rsplit("|", 1)[0] == SUPERVISED]
    if heads:
        table[SUPERVISED]["head_top1"] = seed_stats.mean_std_n(heads)
    return table


def format_summary(table):
    lines = [f"{'encoder':<16}{'seeds':>6}{'own head top-1':>18}{'linear probe':>18}{'k-NN':>18}"]
    for name, row in table.items():
        cells = "".join(f"{row[m][0]:>11.1f} ± {row[m][1]:<4.1f}" if m in row else f"{'-':>18}"
                        for m in ("head_top1", "top1", "knn_top1"))
        lines.append(f"{name:<16}{row['top1'][2]:>6}{cells}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config([args.config], argv=[*args.set.split(), *args.speed_set.split(),
                                           f"--data.train_dataset={args.train}"])
    torch.set_num_threads(cfg["hardware.num_threads"] or os.cpu_count() or 1)
    manifest = read_manifest(args.train)
    num_classes = len(manifest.get("class_names") or [])
    if num_classes < 2:
        raise UserError(f"{args.train} names {num_classes} classes: supervised training needs a labeled beton")
    recorded_cfg = load_config([args.config], argv=args.set.split())
    settings = {"config": args.config, "config_sha256": ablation.config_digest(recorded_cfg), "train": args.train,
                "val": args.val, "set": args.set, "probe_set": args.probe_set,
                "epochs": args.epochs or cfg["training.epochs"],
                "lr": args.lr or cfg["optim.lr"], "weight_decay": args.weight_decay,
                "label_smoothing": args.label_smoothing}
    results, results_path = ablation.load_results(args.out)
    if results["runs"] and results.get("settings") != settings:
        raise UserError(f"{results_path} records other settings ({results.get('settings')}): "
                        "give a fresh --out")
    results.update(settings=settings, machine=cpu_model(), cpus=os.cpu_count(), commit=git_commit(REPO))
    runs_dir = os.path.join(args.out, "runs")
    base_model = {"arch": cfg["model.arch"], "patch_size": cfg["model.patch_size"], "image_size": cfg["data.image_size"]}
    todo = [(name, seed) for seed in args.seeds for name in (ablation.RANDOM_INIT, SUPERVISED)
            if ablation.result_key(name, seed) not in results["runs"]]
    print(f"{len(args.seeds)} seeds, supervised and random init: {2 * len(args.seeds) - len(todo)} recorded, "
          f"{len(todo)} to run (logs under {runs_dir})", flush=True)
    for name, seed in todo:
        if name == SUPERVISED:
            record = run_seed(seed, args=args, cfg=cfg, settings=settings, num_classes=num_classes, runs_dir=runs_dir)
        else:
            record = ablation.run_step(name, seed, args=args, variants={}, base_model=base_model, runs_dir=runs_dir)
        results["runs"][ablation.result_key(name, seed)] = record
        ablation.save_results(results, results_path)  # also takes in runs another process recorded
        print(f"{name} seed {seed}: linear {record['top1']:.1f}, k-NN {record['knn_top1']:.1f}"
              + (f", own head {record['head_top1']:.1f}, {record['train_s']:.0f} s of training"
                 if name == SUPERVISED else ""), flush=True)
    chosen = {k: v for k, v in results["runs"].items() if int(k.rsplit("|", 1)[1]) in args.seeds}
    table = summary_table(chosen)
    print("\n" + format_summary(table))
    results["summary"] = {name: {m: {"mean": v[0], "std": v[1], "n": v[2]} for m, v in row.items()}
                          for name, row in table.items()}
    ablation.save_results(results, results_path)
    print(f"\nwrote {results_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
