"""`make demo`: the whole pipeline on built-in, procedurally drawn data, on the CPU, in minutes.

    python -m hjepa.demo [--out demo_out] [--quick]

1. draws a small ImageNet-style tree (hjepa.synthetic): classes named with real ImageNet-100 wnids,
   plus decoy wnids that are not in ImageNet-100, which the writer must drop;
2. writes the train and val betons with write_datasets/imagenet100.py;
3. pretrains rn_configs/cpu_demo.yaml with hjepa/train.py;
4. probes the trained target encoder and a random-init encoder of the same architecture with
   eval/linear_probe.py, and prints both side by side.

Steps 2-4 run the real command-line tools as subprocesses, exactly as a user would. Every image is a
shape or texture in random colours at a random place and scale, so colour alone predicts nothing.
--quick (for tests) draws a few images per class and trains one short epoch: it checks the plumbing,
not the accuracy. It runs the same tools with the same arguments inside the demo's own process
(runpy, as `python <script>` would), because each new Python that imports ffcv pays ~6 s of numba
compilation on 2 cores: five processes cost half the quick run.
"""
import argparse
import contextlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import time

from hjepa.checkpoint import load_checkpoint
from hjepa.errors import UserError, exit_on_user_error
from hjepa.sources import imagenet100_class_list
from hjepa.synthetic import KINDS, make_imagenet_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("rn_configs", "cpu_demo.yaml")
MARKER = ".hjepa_demo"  # marks a folder this demo made, so a rerun may clear it and nothing else

# Real ImageNet-1k wnids that are not among the 100 classes of ImageNet-100 (tench, toilet tissue).
DECOY_WNIDS = ("n01440764", "n15075141")
NUM_CLASSES = len(KINDS) - len(DECOY_WNIDS)  # one drawing kind per class, decoys included

# (train images per class, val images per class, extra flags for train.py, for linear_probe.py)
# 3,000 train / 500 val images: the size rn_configs/cpu_demo.yaml is judged at on real images
# (Fashion-MNIST, README "Results"), so the demo's training takes the time measured there.
FULL = dict(train_per_class=300, val_per_class=50, train_flags=[], probe_flags=[], in_process=False)
QUICK = dict(train_per_class=8, val_per_class=4,
             train_flags=["--training.epochs=1", "--data.batch_size=16", "--logging.log_every=1"],
             probe_flags=["--eval.epochs=3", "--eval.min_steps=0"], in_process=True)
IMAGE_SIZE = (80, 80)  # drawn size (width, height); training crops resize to data.image_size
# How the demo's images are drawn (hjepa.synthetic.draw_image). Colours, place, scale and angle stay
# random; the object is big, the background calm, and the object's channels sit on the other side of
# a 60-level gap from the background's (bright-on-dark or dark-on-bright, a coin flip), so the outline
# is always visible. With synthetic's defaults (low contrast, busy background, small objects) most
# patches are background whose colour is easy to predict from the context, the short run learned
# little shape, and the probe margin over random init was ~3 points; with these it is 13-16 (measured in
# rn_configs/cpu_demo.yaml).
DRAW_OPTIONS = dict(radius_range=(0.3, 0.45), clutter=12.0, contrast=60.0)

REAL_COMMANDS = """\
  python write_datasets/imagenet100.py --cfg.data_dir=/data/imagenet --cfg.split=train \\
      --cfg.write_path=betons/imagenet100_train.beton
  python write_datasets/imagenet100.py --cfg.data_dir=/data/imagenet --cfg.split=val \\
      --cfg.write_path=betons/imagenet100_val.beton
  python hjepa/train.py --config-file rn_configs/a100_100ep.yaml
  python eval/linear_probe.py --eval.checkpoint=runs/<run>/checkpoint.pt \\
      --eval.train_dataset=betons/imagenet100_train.beton --eval.val_dataset=betons/imagenet100_val.beton"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m hjepa.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for everything the demo makes (cleared first)")
    parser.add_argument("--quick", action="store_true", help="tiny data and one short epoch (for tests)")
    return parser.parse_args(argv)


def prepare_out_dir(out):
    """An empty `out`; a previous demo's folder is cleared, any other non-empty folder is refused."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise UserError(f"{out} exists and was not made by the demo: pass --out=<new folder>")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w").close()


def run_tool(title, args, *, keep_lines=False, in_process=False):
    """Run a repository CLI from the repo root, echoing its output as it comes (its tqdm bars on
    stderr pass straight through): as a subprocess, or with in_process as `python <script>` would run
    it, in this process. Returns its stdout lines when keep_lines."""
    print(f"\n== {title}\n$ {' '.join(['python', *args])}", flush=True)
    start = time.perf_counter()
    if in_process:
        status, lines = _run_script_here(*args)
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as proc:
            lines = []
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line.rstrip("\n"))
        status = proc.returncode
    if status != 0:
        raise UserError(f"{title} failed (exit status {status}); its message is above")
    print(f"-- {title}: {time.perf_counter() - start:.0f} s", flush=True)
    return lines if keep_lines else []


class _EchoLines:
    """A stdout that prints as it goes and keeps what it printed, for _run_script_here."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, text):
        self.text.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def _run_script_here(script, *flags):
    """(exit status, stdout lines) of `python script *flags` run in this process: argv, sys.path[0]
    (the script's folder) and the working directory as Python sets them, restored afterwards."""
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    path = os.path.join(REPO, script)
    echo = _EchoLines(sys.stdout)
    sys.argv, sys.path[0] = [path, *flags], os.path.dirname(path)
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(echo):
            runpy.run_path(path, run_name="__main__")
        status = 0
    except SystemExit as stop:  # exit_on_user_error's status 1, or a script's own sys.exit
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)
    return status, "".join(echo.text).splitlines()


def write_split(tree, split, beton, real_wnids, *, in_process):
    """Write one split with the real writer; check it kept the real classes and dropped the decoys."""
    lines = run_tool(f"write {split} beton", [
        "write_datasets/imagenet100.py", f"--cfg.data_dir={tree}", f"--cfg.split={split}",
        f"--cfg.write_path={beton}", "--cfg.allow_missing_classes=1"], keep_lines=True, in_process=in_process)
    with open(os.path.splitext(beton)[0] + ".json") as f:
        counts = json.load(f)["per_class_counts"]
    kept = sorted(w for w, n in counts.items() if n > 0)
    leaked = [w for w in DECOY_WNIDS if counts.get(w)]
    if kept != sorted(real_wnids) or leaked:
        raise RuntimeError(f"{beton} holds classes {kept}, expected {sorted(real_wnids)} (decoys leaked: {leaked})")
    dropped_line = next((line for line in lines if "dropped" in line), "")
    print(f"   {split}: {len(kept)} classes kept; decoys {', '.join(DECOY_WNIDS)} dropped "
          f"(writer: \"{dropped_line.strip()}\")", flush=True)


def main_steps(out, settings):
    start = time.perf_counter()
    prepare_out_dir(out)
    tree, betons, runs = (os.path.join(out, name) for name in ("imagenet_tree", "betons", "runs"))
    real_wnids = imagenet100_class_list()[:NUM_CLASSES]

    # 1. data: real ImageNet-100 wnids drawn as KINDS[0..NUM_CLASSES-1], decoys as the rest
    print(f"== draw {NUM_CLASSES} ImageNet-100 classes + {len(DECOY_WNIDS)} decoy classes "
          f"({settings['train_per_class']} train / {settings['val_per_class']} val images each) into {tree}",
          flush=True)
    t = time.perf_counter()
    counts = make_imagenet_tree(tree, wnids=real_wnids, decoy_wnids=DECOY_WNIDS,
                                train_per_class=settings["train_per_class"], val_per_class=settings["val_per_class"],
                                size=IMAGE_SIZE, seed=0, num_workers=min(2, os.cpu_count() or 1),
                                draw_options=DRAW_OPTIONS)
    print(f"-- drew {counts['train']} train and {counts['val']} val images in {time.perf_counter() - t:.0f} s; "
          "the writer warns that the other ImageNet-100 classes are missing: expected here", flush=True)

    # 2. betons, through the real writer
    train_beton = os.path.join(betons, "imagenet100_train.beton")
    val_beton = os.path.join(betons, "imagenet100_val.beton")
    in_process = settings["in_process"]
    write_split(tree, "train", train_beton, real_wnids, in_process=in_process)
    write_split(tree, "val", val_beton, real_wnids, in_process=in_process)

    # 3. pretraining
    run_tool("pretrain H-JEPA", [
        "hjepa/train.py", "--config-file", CONFIG, f"--data.train_dataset={train_beton}",
        f"--data.val_dataset={val_beton}", f"--logging.folder={runs}", "--logging.run_name=cpu_demo",
        *settings["train_flags"]], in_process=in_process)
    run_dir = os.path.join(runs, "cpu_demo")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")

    # 4. probes: trained target encoder vs. a random-init encoder of the checkpoint's architecture
    model_config = load_checkpoint(checkpoint)["model_config"]
    data_flags = [f"--eval.train_dataset={train_beton}", f"--eval.val_dataset={val_beton}", *settings["probe_flags"]]
    trained_json, random_json = os.path.join(out, "probe_trained.json"), os.path.join(out, "probe_random.json")
    run_tool("linear probe: trained encoder", [
        "eval/linear_probe.py", f"--eval.checkpoint={checkpoint}", f"--eval.out={trained_json}", *data_flags],
        in_process=in_process)
    run_tool("linear probe: random-init encoder", [
        "eval/linear_probe.py", "--eval.random_init=1", f"--model.arch={model_config['arch']}",
        f"--model.patch_size={model_config['patch_size']}", f"--data.image_size={model_config['image_size']}",
        f"--eval.cache_dir={os.path.join(out, 'features')}", f"--eval.out={random_json}", *data_flags],
        in_process=in_process)

    report(trained_json, random_json, run_dir, time.perf_counter() - start, quick=settings is QUICK)


def report(trained_json, random_json, run_dir, seconds, *, quick):
    results = {}
    for name, path in (("random init", random_json), ("H-JEPA pretrained", trained_json)):
        with open(path) as f:
            results[name] = json.load(f)
    random, trained = results["random init"], results["H-JEPA pretrained"]
    print(f"\n== result: {trained['arch']} at {trained['image_size']} px, {NUM_CLASSES} classes, "
          f"{trained['num_train']} train / {trained['num_val']} val images")
    print(f"  {'encoder':<20}{'linear top-1':>14}{'k-NN top-1':>12}")
    for name, r in results.items():
        print(f"  {name:<20}{r['top1']:>13.1f}%{r['knn_top1']:>11.1f}%")
    print(f"  {'difference':<20}{trained['top1'] - random['top1']:>+13.1f} {trained['knn_top1'] - random['knn_top1']:>+11.1f}")
    if quick:
        print("  (--quick: tiny data and one short epoch; these numbers mean nothing)")
    pictures = [os.path.join(run_dir, name) for name in ("curves.png", "masks.png") if
                os.path.isfile(os.path.join(run_dir, name))]
    print(f"\npictures: {', '.join(pictures)} (redraw: python -m hjepa.plots {run_dir})")
    print(f"results: {trained_json}, {random_json}")
    print(f"demo wall time: {seconds / 60:.1f} min")
    print(f"\nthe real thing (ImageNet-1k folder with train/ and val/):\n{REAL_COMMANDS}", flush=True)


@exit_on_user_error
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    main_steps(args.out, QUICK if args.quick else FULL)


if __name__ == "__main__":
    main()
