"""Issue 8: bad input fails in one line, interruptions lose minutes, untrusted files run no code.

Bad input: each case calls an entry point's own main(argv) -- the function `python <script>` runs,
inside exit_on_user_error -- and checks exit status 1, one `error:` line naming the offending item,
no traceback and no file written. A real process pays seconds of imports (FFCV's libffcv load
alone is ~3 s), so only the cases where the process itself matters run as one: the checkpoints with
code in them (which must not run in any process) through train.py and linear_probe.py, and one
start-up each of bench/train_throughput.py and write_datasets/multi.py.
Those start side by side in one module fixture. tests/test_train.py, test_probe.py and
test_loaders.py already run train.py and linear_probe.py as processes for other bad inputs.

Interruptions: real `python hjepa/train.py` processes get SIGINT, SIGTERM or SIGKILL; they use the
deterministic 32 px vit_micro of tests/test_train.py, so a resumed run is compared bit for bit with
one that was not interrupted. The loader soak (item 5) is in tests/test_soak.py.
"""
import importlib
import json
from pathlib import Path
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from hjepa import train as train_module
from hjepa.beton import manifest_path
from hjepa.checkpoint import load_checkpoint, save_checkpoint
from hjepa.synthetic import make_imagenet_tree
from tiny_training import REPO, TINY, assert_same_parameters, final_parameters

STEPS_PER_EPOCH, EPOCHS = 4, 10  # tiny_beton: 64 images in batches of 16
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS


class CodeOnLoad:
    """Pickles as a call to os.system: loading it with plain pickle would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------
# Bad input: exit status 1, one line naming the offending item, no traceback, nothing written


@pytest.fixture(scope="module")
def bad_files(tiny_beton, tmp_path_factory):
    """Namespace of broken inputs, all in one folder (`folder`)."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    f = types.SimpleNamespace(folder=folder, beton=tiny_beton)
    data = Path(tiny_beton).read_bytes()
    manifest = json.loads(Path(manifest_path(tiny_beton)).read_text())

    f.truncated = folder / "truncated.beton"  # a copy cut in half, beside the original's manifest
    f.truncated.write_bytes(data[: len(data) // 2])
    shutil.copy(manifest_path(tiny_beton), manifest_path(f.truncated))
    f.cut_table = folder / "cut_table.beton"  # the end (allocation table) cut off, no manifest
    f.cut_table.write_bytes(data[:-100])
    f.junk = folder / "junk.beton"  # not a beton, no manifest
    f.junk.write_bytes(np.random.default_rng(0).bytes(50_000))
    f.stale = folder / "stale.beton"  # the manifest disagrees with the beton
    shutil.copy(tiny_beton, f.stale)
    Path(manifest_path(f.stale)).write_text(json.dumps({**manifest, "num_samples": 65}))
    f.escape = folder / "escape.beton"  # the manifest's dataset name climbs out of any folder
    shutil.copy(tiny_beton, f.escape)
    Path(manifest_path(f.escape)).write_text(json.dumps({**manifest, "dataset": "../../escaped"}))

    f.missing_ckpt = folder / "missing.pt"
    save_checkpoint({"model_config": {}, "weights": torch.randn(50_000)}, str(folder / "whole.pt"))
    f.cut_ckpt = folder / "cut.pt"
    f.cut_ckpt.write_bytes((folder / "whole.pt").read_bytes()[:100_000])
    f.noise_ckpt = folder / "noise.pt"
    f.noise_ckpt.write_bytes(np.random.default_rng(1).bytes(100_000))
    for who in ("train", "probe"):
        path, marker = folder / f"code_{who}.pt", folder / f"code_ran_{who}"
        torch.save({"format": "hjepa-checkpoint-v1", "model_config": CodeOnLoad(marker)}, path)
        setattr(f, f"code_ckpt_{who}", path)
        setattr(f, f"code_marker_{who}", marker)

    f.bad_images = folder / "bad_images"  # 12 good JPEGs and 3 unreadable files
    make_imagenet_tree(str(f.bad_images), wnids=["n0000000a", "n0000000b"], train_per_class=6,
                       val_per_class=0, size=(40, 30))
    class_a = f.bad_images / "train" / "n0000000a"
    good = (class_a / "n0000000a_0.JPEG").read_bytes()
    (class_a / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (class_a / "empty.JPEG").write_bytes(b"")
    (class_a / "notes.txt").write_text("not an image")
    f.few_images = folder / "few_images"  # 6 good JPEGs
    make_imagenet_tree(str(f.few_images), wnids=["n0000000a", "n0000000b"], train_per_class=3,
                       val_per_class=0, size=(40, 30))
    return f


def train_cli(f, out, *extra):
    return ["hjepa/train.py", f"--data.train_dataset={f.beton}", f"--logging.folder={out / 'runs'}", *TINY,
            "--training.epochs=1", *extra]


def mixture_cli(f, out, multi_beton, mixture):
    return train_cli(f, out, f"--data.train_dataset={multi_beton}", "--data.order=weighted",
                     f"--data.mixture={mixture}")


def probe_cli(f, out, *extra):
    return ["eval/linear_probe.py", "--eval.random_init=1", "--model.arch=vit_micro", "--model.patch_size=4",
            "--data.image_size=32", f"--eval.train_dataset={f.beton}", f"--eval.val_dataset={f.beton}",
            "--eval.epochs=1", "--eval.min_steps=0", "--eval.num_workers=1", f"--eval.cache_dir={out / 'features'}",
            f"--eval.out={out / 'probe.json'}", "--logging.progress=0", *extra]


def loader_bench_cli(f, out, *extra):
    return ["bench/loader_throughput.py", f"--bench.out={out / 'result.json'}", f"--bench.work_dir={out / 'work'}",
            "--bench.num_workers=1", "--bench.epochs=1", "--data.image_size=32", *extra]


def train_bench_cli(f, out, *extra):
    return ["bench/train_throughput.py", f"--data.train_dataset={f.beton}", f"--bench.out={out / 'result.json'}",
            "--bench.steps=1", "--bench.warmup_steps=0", *TINY, *extra]


# (id, argv given the bad files, an empty output folder and the combined beton, what the error line must contain)
BAD_INPUTS = [
    ("train-truncated-beton", lambda f, out, m: train_cli(f, out, f"--data.train_dataset={f.truncated}"),
     ["truncated.beton", "truncated copy or stale manifest"]),
    ("train-beton-with-its-table-cut-off", lambda f, out, m: train_cli(f, out, f"--data.train_dataset={f.cut_table}"),
     ["cut_table.beton", "truncated"]),
    ("train-not-a-beton", lambda f, out, m: train_cli(f, out, f"--data.train_dataset={f.junk}"),
     ["junk.beton", "not a .beton"]),
    ("train-manifest-disagrees", lambda f, out, m: train_cli(f, out, f"--data.train_dataset={f.stale}"),
     ["stale.beton", "holds 64 samples but its manifest says 65"]),
    ("train-batch-larger-than-dataset", lambda f, out, m: train_cli(f, out, "--data.batch_size=65"),
     ["data.batch_size=65", "64 samples"]),
    ("train-image-size-not-divisible", lambda f, out, m: train_cli(f, out, "--data.image_size=30"),
     ["image_size 30 is not divisible by patch_size 4"]),
    ("train-resume-missing-checkpoint", lambda f, out, m: train_cli(f, out, f"--training.resume={f.missing_ckpt}"),
     ["checkpoint not found", "missing.pt"]),
    ("train-resume-truncated-checkpoint", lambda f, out, m: train_cli(f, out, f"--training.resume={f.cut_ckpt}"),
     ["cut.pt", "not a readable hjepa checkpoint"]),
    ("train-resume-random-bytes", lambda f, out, m: train_cli(f, out, f"--training.resume={f.noise_ckpt}"),
     ["noise.pt", "not a readable hjepa checkpoint"]),
    ("train-resume-checkpoint-with-code", lambda f, out, m: train_cli(f, out, f"--training.resume={f.code_ckpt_train}"),
     ["code_train.pt", "not a readable hjepa checkpoint"]),
    ("train-mixture-item-without-colon", lambda f, out, m: mixture_cli(f, out, m, "big=0.5"),
     ["mixture item 'big=0.5' is not name:weight"]),
    ("train-mixture-unknown-member", lambda f, out, m: mixture_cli(f, out, m, "big:1,zzz:1"),
     ["unknown member 'zzz'", "big, mid, small"]),
    ("train-mixture-member-twice", lambda f, out, m: mixture_cli(f, out, m, "big:1,big:2"),
     ["member 'big' twice"]),
    ("train-mixture-weight-not-a-number", lambda f, out, m: mixture_cli(f, out, m, "big:lots"),
     ["weight 'lots' of 'big' is not a number"]),
    ("train-mixture-weight-infinite", lambda f, out, m: mixture_cli(f, out, m, "big:inf,mid:1"),
     ["weight of 'big' must be a finite number"]),
    ("train-mixture-all-zero", lambda f, out, m: mixture_cli(f, out, m, "big:0,mid:0"),
     ["has no positive weight"]),
    ("probe-truncated-beton", lambda f, out, m: probe_cli(f, out, f"--eval.train_dataset={f.truncated}"),
     ["truncated.beton", "truncated copy or stale manifest"]),
    ("probe-image-size-not-divisible", lambda f, out, m: probe_cli(f, out, "--eval.image_size=30"),
     ["image_size 30 is not divisible by patch_size 4"]),
    ("probe-truncated-checkpoint", lambda f, out, m: probe_cli(f, out, "--eval.random_init=0",
                                                               f"--eval.checkpoint={f.cut_ckpt}"),
     ["cut.pt", "not a readable hjepa checkpoint"]),
    ("probe-checkpoint-with-code", lambda f, out, m: probe_cli(f, out, "--eval.random_init=0",
                                                               f"--eval.checkpoint={f.code_ckpt_probe}"),
     ["code_probe.pt", "not a readable hjepa checkpoint"]),
    ("loader-bench-missing-data-dir", lambda f, out, m: loader_bench_cli(
        f, out, f"--bench.data_dir={f.folder / 'nowhere'}"),
     ["bench.data_dir not found", "nowhere"]),
    ("loader-bench-unreadable-images", lambda f, out, m: loader_bench_cli(f, out, f"--bench.data_dir={f.bad_images}",
                                                                          "--bench.batch_size=4"),
     ["2 of 14 images are unreadable"]),
    ("loader-bench-batch-larger-than-dataset", lambda f, out, m: loader_bench_cli(
        f, out, f"--bench.data_dir={f.few_images}", "--bench.batch_size=64"),
     ["holds 6 images, fewer than bench.batch_size=64"]),
    ("train-bench-beton-with-its-table-cut-off", lambda f, out, m: train_bench_cli(
        f, out, f"--data.train_dataset={f.cut_table}"),
     ["cut_table.beton", "truncated"]),
    ("train-bench-image-size-not-divisible", lambda f, out, m: train_bench_cli(f, out, "--data.image_size=30"),
     ["image_size 30 is not divisible by patch_size 4"]),
    ("multi-truncated-member", lambda f, out, m: [
        "write_datasets/multi.py", f"--cfg.members=b={f.truncated},a={f.beton}",
        f"--cfg.write_path={out / 'mix.beton'}", "--cfg.num_workers=1"],
     ["truncated.beton", "truncated copy or stale manifest"]),
    ("multi-member-not-a-beton", lambda f, out, m: [
        "write_datasets/multi.py", f"--cfg.members=a={f.beton},b={f.junk}",
        f"--cfg.write_path={out / 'mix.beton'}", "--cfg.num_workers=1"],
     ["junk"]),
]


# The cases that run as real processes: the entry points' own start-up, and the checkpoints with code
# in them (which must not run in any process). The rest call the same main(argv) in this process.
IN_A_PROCESS = ["train-resume-checkpoint-with-code", "probe-checkpoint-with-code",
                "train-bench-beton-with-its-table-cut-off", "multi-truncated-member"]


def entry_point(script):
    """main() of an entry point given by path (`bench/x.py`): the module `python -m bench.x` runs."""
    return importlib.import_module(script.removesuffix(".py").replace("/", ".")).main


def assert_one_error_line(stderr, fragments):
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0]


def files_under(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


@pytest.fixture(scope="module")
def process_runs(bad_files, tiny_multi_beton, tmp_path_factory):
    """{case id: (CompletedProcess, its output folder)} of the IN_A_PROCESS cases, run side by side."""
    outputs = tmp_path_factory.mktemp("bad_input_outputs")

    def run(case):
        name, argv, _ = case
        out = outputs / name
        out.mkdir()
        proc = subprocess.run([sys.executable, *argv(bad_files, out, tiny_multi_beton)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        return name, (proc, out)

    with ThreadPoolExecutor(max_workers=len(IN_A_PROCESS)) as pool:
        return dict(pool.map(run, [case for case in BAD_INPUTS if case[0] in IN_A_PROCESS]))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_exits_1_with_one_line_naming_it_and_writes_nothing(case, bad_files, tiny_multi_beton, tmp_path,
                                                                      request, capsys):
    name, argv, fragments = case
    inputs_before = files_under(bad_files.folder)
    if name in IN_A_PROCESS:
        proc, out = request.getfixturevalue("process_runs")[name]
        code, stderr = proc.returncode, proc.stderr
    else:
        out = tmp_path
        script, *args = argv(bad_files, out, tiny_multi_beton)
        with pytest.raises(SystemExit) as exit_info:
            entry_point(script)(args)
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 1, stderr[-3000:]
    assert_one_error_line(stderr, fragments)
    assert files_under(out) == []
    assert not (out / "runs").exists()  # train makes its run folder only once everything has loaded
    # --training.resume=PATH makes PATH's folder the run folder: a failed resume writes nothing there
    assert files_under(bad_files.folder) == inputs_before


# ----------------------------------------------------------------------------------------------
# Untrusted files


@pytest.mark.parametrize("who", ["train", "probe"])
def test_checkpoint_with_pickled_code_is_refused_without_running_it(who, bad_files, process_runs):
    proc, _ = process_runs["probe-checkpoint-with-code" if who == "probe" else "train-resume-checkpoint-with-code"]
    assert proc.returncode == 1
    assert os.path.exists(bad_files.folder / f"code_{who}.pt")
    assert not os.path.exists(getattr(bad_files, f"code_marker_{who}"))


def test_manifest_names_cannot_place_files_outside_the_cache_folder(bad_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        entry_point("eval/linear_probe.py")(probe_cli(bad_files, tmp_path, f"--eval.train_dataset={bad_files.escape}",
                                                      f"--eval.val_dataset={bad_files.escape}")[1:])
    assert "leads outside" in capsys.readouterr().err
    for folder in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        assert not [name for name in os.listdir(folder) if name.startswith("escaped")]


# ----------------------------------------------------------------------------------------------
# Interruptions and disk: kill a real training process, resume it, compare with an uninterrupted run


def run_args(beton, folder, run_name, *extra):
    return [f"--data.train_dataset={beton}", f"--logging.folder={folder}", f"--logging.run_name={run_name}", *TINY,
            f"--training.epochs={EPOCHS}", "--training.checkpoint_every=1", "--training.keep_checkpoints=2",
            "--training.deterministic=1", "--logging.log_every=1", "--logging.plots=0", *extra]


def assert_same_final_parameters(run_dir, reference_dir):
    assert final_parameters(reference_dir)[0] == TOTAL_STEPS
    assert_same_parameters(run_dir, reference_dir)


def logged_steps(run_dir):
    """Steps in metrics.jsonl so far (a line being written may be incomplete: skipped)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def interrupt_training(beton, folder, run_name, signum, ready):
    """Start `python hjepa/train.py`, send `signum` once ready(run_dir) holds, wait for it to end.

    Returns (exit status, its output, run folder)."""
    run_dir = os.path.join(folder, run_name)
    with open(os.path.join(folder, f"{run_name}.log"), "w+") as log:
        proc = subprocess.Popen([sys.executable, "hjepa/train.py", *run_args(beton, folder, run_name)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not ready(run_dir):
                assert proc.poll() is None, "training ended before it could be interrupted"
                assert time.monotonic() < deadline, "training never got ready to be interrupted"
                time.sleep(0.02)
            assert proc.poll() is None, "training ended before it could be interrupted"
            proc.send_signal(signum)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        return proc.returncode, log.read(), run_dir


@pytest.fixture(scope="module")
def uninterrupted(tiny_beton, tmp_path_factory):
    """The run folder of one uninterrupted run (in this process: the same code, without the start-up)."""
    return train_module.main(run_args(tiny_beton, tmp_path_factory.mktemp("runs"), "uninterrupted"))


@pytest.fixture(scope="module")
def interrupted(tiny_beton, tmp_path_factory):
    """{signal name: (exit status, output, run folder)}: three training processes, run side by side.
    SIGINT and SIGTERM arrive after step 2 is logged; SIGKILL once the first checkpoint exists."""
    folder = tmp_path_factory.mktemp("interrupted")
    after_step_2 = lambda run_dir: len(logged_steps(run_dir)) >= 2  # noqa: E731
    first_checkpoint = lambda run_dir: os.path.exists(os.path.join(run_dir, "checkpoint.pt"))  # noqa: E731
    plans = {"SIGINT": (signal.SIGINT, after_step_2), "SIGTERM": (signal.SIGTERM, after_step_2),
             "SIGKILL": (signal.SIGKILL, first_checkpoint)}
    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        futures = {name: pool.submit(interrupt_training, tiny_beton, folder, name.lower(), signum, ready)
                   for name, (signum, ready) in plans.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_a_checkpoint_at_the_current_step_and_exit_0(name, interrupted):
    code, output, run_dir = interrupted[name]
    assert code == 0, output[-3000:]
    stopped_at = int(re.search(r"stopped by signal \S+ at step (\d+)", output).group(1))
    assert 2 <= stopped_at < TOTAL_STEPS
    assert logged_steps(run_dir)[-1] == stopped_at  # log_every=1: the last step it trained
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["step"] == stopped_at
    assert "Traceback" not in output


def test_resuming_after_sigint_ends_with_the_parameters_of_an_uninterrupted_run(interrupted, uninterrupted, tiny_beton):
    _, _, run_dir = interrupted["SIGINT"]
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    train_module.main(run_args(tiny_beton, os.path.dirname(run_dir), "sigint", f"--training.resume={checkpoint}"))
    assert_same_final_parameters(run_dir, uninterrupted)


def test_sigkill_leaves_the_last_checkpoint_loadable_and_resume_ends_like_an_uninterrupted_run(
        interrupted, uninterrupted, tiny_beton):
    code, output, run_dir = interrupted["SIGKILL"]
    assert code == -signal.SIGKILL, output[-3000:]
    saved = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    assert saved["step"] % STEPS_PER_EPOCH == 0 and 0 < saved["step"] < TOTAL_STEPS
    # A kill in the middle of a save leaves its temporary file: never to be taken for a checkpoint.
    for name in ("checkpoint.pt.tmp.99999", f"checkpoint_ep{EPOCHS + 5:04d}.pt.tmp.99999"):
        with open(os.path.join(run_dir, name), "wb") as f:
            f.write(b"half a checkpoint")
    train_module.main(run_args(tiny_beton, os.path.dirname(run_dir), "sigkill", "--training.resume=auto"))
    assert_same_final_parameters(run_dir, uninterrupted)
    assert not [name for name in os.listdir(run_dir) if ".tmp" in name]  # and the resumed run removed them


def test_only_the_last_k_epoch_checkpoints_and_the_latest_remain(uninterrupted):
    checkpoints = sorted(name for name in os.listdir(uninterrupted) if name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint.pt", f"checkpoint_ep{EPOCHS - 1:04d}.pt", f"checkpoint_ep{EPOCHS:04d}.pt"]
    assert load_checkpoint(os.path.join(uninterrupted, f"checkpoint_ep{EPOCHS - 1:04d}.pt"))["epoch"] == EPOCHS - 1
