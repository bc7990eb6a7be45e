"""Ablation: variants x seeds trained on given betons, probed beside random init and raw pixels: table, JSON, PNG.

    python bench/ablation.py --config rn_configs/cpu_demo.yaml \\
        --train betons/fmnist_train.beton --val betons/fmnist_val.beton --seeds 0,1,2 \\
        --variant "1 level=--model.num_levels=1 --model.level_weights=1.0" \\
        --variant "2 levels=--model.num_levels=2 --model.level_weights=1.0,0.5" --out ablation_fmnist

A variant is `name=--section.param=value ...` on top of --config (and of --set, which applies to all);
--variants FILE reads them from YAML (`name: [--section.param=value, ...]`). Without either, the
variants are 1, 2 and 3 levels. Every (variant, seed) is a real `hjepa/train.py` run in
<out>/runs/<variant>-s<seed> with training.seed = data.seed = seed, then `eval/linear_probe.py` on its
target encoder (eval.seed = seed); every seed also probes a random-init encoder of the base
architecture and the raw pixels (`eval/linear_probe.py --eval.pixels=1`: the same eval images,
normalised and flattened, under the same probe; their features are extracted once, in
<out>/runs/raw_pixels_features). <out>/results.json is rewritten after each finished step, which
makes the whole command resumable: a rerun skips what is recorded, and a run cut off mid-training continues from its
last checkpoint (training.resume=auto); a rerun whose config resolves to other values (an edited
--config file, another --set) or whose variant has other overrides is refused. Child output goes to
train.log / probe.log in the run folder.
Prints mean ± std (sample std over seeds) of linear and k-NN top-1, and each variant minus the first one
paired by seed (the spread that says whether one beats the other) with the sign-flip test's p-value
(bench/seed_stats.py, which holds these statistics: five seeds can give no p below 0.0625), writes
<out>/results.json and <out>/ablation.png (bars with std error bars). Runs on whatever device train.py
picks (CPU here).

--test BETON scores every probe on a second held-out beton as well (the same probe, fitted on
--train; its tables, <out>/ablation_test.png and results.json's summary_test / paired_test): a
500-image --val measures a run's top-1 to about ±1.8 points (binomial std at 80%), a 9,000-image test
set to ±0.4. Given to a finished folder, it scores the recorded runs without training any again.

    python bench/ablation.py --report ablation_fmnist ablation_fmnist_seeds_5_9

trains nothing: it prints the same tables for the runs recorded in several folders together (more
seeds run later into fresh folders, on the same betons).
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script, this file's siblings import as bench.<module> from the root
    sys.path.insert(0, REPO)

from bench.seed_stats import format_table, paired_differences, summarize  # noqa: E402
from hjepa.config import config_as_dict, load_config  # noqa: E402
from hjepa.errors import UserError, exit_on_user_error  # noqa: E402
from hjepa.runlog import cpu_model, git_commit  # noqa: E402

RANDOM_INIT = "random init"
PIXELS = "raw pixels"
BASELINES = (RANDOM_INIT, PIXELS)  # probed at every seed, trained never
DEFAULT_VARIANTS = {
    "1 level": ["--model.num_levels=1", "--model.level_weights=1.0"],
    "2 levels": ["--model.num_levels=2", "--model.level_weights=1.0,0.5"],
    "3 levels": ["--model.num_levels=3", "--model.level_weights=1.0,0.5,0.25"],
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/ablation.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="base training config (YAML)")
    parser.add_argument("--train", help="training beton (pretraining and probe)")
    parser.add_argument("--val", help="validation beton (probe)")
    parser.add_argument("--test", help="a second held-out beton, e.g. a larger test set: each probe is also "
                                       "scored on it (fitted on --train as before); on a finished folder "
                                       "this scores the recorded runs without training them again")
    parser.add_argument("--out", help="ablation folder: runs, results.json, ablation.png")
    parser.add_argument("--report", nargs="+", metavar="DIR",
                        help="train nothing: print the tables of the runs recorded in these ablation folders "
                             "together (the same betons; e.g. more seeds run later into fresh folders)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="a variant: name=--section.param=value ... (repeatable)")
    parser.add_argument("--variants", help="YAML file {name: [--section.param=value, ...]}")
    parser.add_argument("--set", default="", metavar="OVERRIDES",
                        help="overrides for every run; write --set='--training.epochs=40 ...' "
                             "(with '=': the value starts with --)")
    parser.add_argument("--probe-set", default="", metavar="OVERRIDES", help="overrides for every probe")
    parser.add_argument("--speed-set", default="", metavar="OVERRIDES",
                        help="overrides that change speed, not results, for every train and probe (e.g. "
                             "'--hardware.num_threads=1 --data.num_workers=1'); not part of the recorded settings")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each a separate process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    required = ("config", "train", "val", "out")
    if args.report:
        given = [f"--{name.replace('_', '-')}" for name in (*required, "test", "seeds", "variant", "variants",
                                                             "set", "probe_set", "speed_set", "jobs")
                 if getattr(args, name) != parser.get_default(name)]
        if given:
            raise UserError(f"--report prints what the folders recorded and trains nothing: give it alone, "
                            f"without {' '.join(given)}")
    else:
        missing = [f"--{name}" for name in required if not getattr(args, name)]
        if missing:
            raise UserError(f"{' '.join(missing)} missing: training an ablation needs --config, --train, --val "
                            "and --out (or give --report DIR ... alone)")
    return args


def parse_variants(specs, path):
    """{name: [override, ...]} from `name=overrides` strings and/or a YAML file; the default set if none."""
    variants = {}
    if path:
        if not os.path.isfile(path):
            raise UserError(f"variants file not found: {path}")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict) or not all(isinstance(v, list) for v in tree.values()):
            raise UserError(f"{path} must map each variant name to a list of --section.param=value overrides")
        variants.update({str(k): [str(x) for x in v] for k, v in tree.items()})
    for spec in specs:
        name, sep, overrides = spec.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--variant '{spec}' must read name=--section.param=value ...")
        variants[name.strip()] = overrides.split()
    for name, overrides in variants.items():
        if name in BASELINES:
            raise UserError(f"'{name}' is a baseline's name: choose another variant name")
        bad = [o for o in overrides if not re.fullmatch(r"--[\w]+\.[\w]+=\S*", o)]
        if bad:
            raise UserError(f"variant '{name}': overrides must read --section.param=value, got {' '.join(bad)}")
    return variants or dict(DEFAULT_VARIANTS)


def run_folder_name(variant, seed):
    return re.sub(r"[^\w.-]+", "_", variant).strip("_") + f"-s{seed}"


def plan_runs(variants, seeds):
    """Every step in order, as (variant or baseline name, seed): per seed, the baselines first."""
    return [(name, seed) for seed in seeds for name in [*BASELINES, *variants]]


def result_key(name, seed):
    return f"{name}|{seed}"


def config_digest(cfg):
    """sha256 of a resolved config's values: the same for the same settings whatever file or path
    they came from, different when an edit to the file (or to a file it inherits) changes any."""
    text = json.dumps(config_as_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_recorded(results, variants, settings):
    """Refuse to mix: recorded runs must come from the same base settings and the same overrides."""
    if results.get("settings") not in (None, settings):
        raise UserError(f"{results['path']} was made with other settings ({results['settings']}): use another --out")
    for key, record in results.get("runs", {}).items():
        name = key.rsplit("|", 1)[0]
        if name in variants and record["overrides"] != variants[name]:
            raise UserError(f"variant '{name}' is recorded with overrides {record['overrides']}, now "
                            f"{variants[name]}: rename it or use another --out")


def pending(plan, results, test=None):
    """The steps of `plan` that have no record yet, or (with a test beton) no score on that one."""
    runs = results.get("runs", {})
    return [(name, seed) for name, seed in plan
            if result_key(name, seed) not in runs or (test and runs[result_key(name, seed)].get("test") != test)]


def on_test_set(runs):
    """(test beton or None, the runs scored on it with those scores as their top1 / knn_top1, so the
    summary and paired tables read them); UserError if they were scored on different betons."""
    tests = {record["test"] for record in runs.values() if "test" in record}
    if len(tests) > 1:
        raise UserError(f"the runs were scored on different test betons ({', '.join(sorted(tests))}): "
                        "rerun the command with one --test")
    return next(iter(tests), None), {key: {**record, "top1": record["test_top1"], "knn_top1": record["test_knn_top1"]}
                                     for key, record in runs.items() if "test" in record}


def plot_table(table, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    x = np.arange(2)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(4.6 + 0.6 * len(names), 3.8))
    for i, name in enumerate(names):
        means = [table[name][m][0] for m in ("top1", "knn_top1")]
        stds = [table[name][m][1] for m in ("top1", "knn_top1")]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                      label=f"{name} (n={table[name]['top1'][2]})",
                      color={RANDOM_INIT: "0.7", PIXELS: "0.45"}.get(name))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, ["linear top-1", "k-NN top-1"])
    ax.set_ylabel("top-1 (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    low = min(table[n][m][0] - table[n][m][1] for n in names for m in ("top1", "knn_top1"))
    ax.set_ylim(max(0.0, low - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_results(results, path):
    """Atomic rewrite; runs that another ablation process on the same folder recorded meanwhile are
    kept (processes may share a folder if they run different seeds or variants), and so are the fields
    it added to a run both hold (test scores: one process may score on --test what another trained)."""
    if os.path.isfile(path):
        with open(path) as f:
            on_disk = json.load(f).get("runs", {})
        results["runs"] = {**on_disk, **{key: {**on_disk.get(key, {}), **record}
                                         for key, record in results["runs"].items()}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in results.items() if k != "path"}, f, indent=2)
    os.replace(tmp, path)


def load_results(folder):
    """(results, path) of <folder>/results.json, {"runs": {}} if there is none yet; makes the folder."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return {"runs": {}}, path
    with open(path) as f:
        return json.load(f), path


def run_logged(args, log_path):
    """Run `python *args` from the repo root with its output in log_path; UserError naming the log on failure."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ python {' '.join(args)}\n")
        log.flush()
        status = subprocess.run([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if status != 0:
        raise UserError(f"{args[0]} failed (exit status {status}); see {log_path}")
    return time.perf_counter() - start


def probe_command(name, folder, runs_dir, base_model):
    """`eval/linear_probe.py` and the arguments that choose what it probes: the raw pixels, a
    random-init encoder of the base architecture, or the run's checkpoint (its target encoder)."""
    if name == PIXELS:  # the features do not depend on the seed: one cache for every seed
        return ["eval/linear_probe.py", "--eval.pixels=1", f"--data.image_size={base_model['image_size']}",
                f"--eval.cache_dir={os.path.join(runs_dir, 'raw_pixels_features')}"]
    if name == RANDOM_INIT:
        return ["eval/linear_probe.py", "--eval.random_init=1", f"--model.arch={base_model['arch']}",
                f"--model.patch_size={base_model['patch_size']}", f"--data.image_size={base_model['image_size']}",
                f"--eval.cache_dir={os.path.join(folder, 'features')}"]
    return ["eval/linear_probe.py", f"--eval.checkpoint={os.path.join(folder, 'checkpoint.pt')}"]


def run_step(name, seed, *, args, variants, base_model, runs_dir, test=None, recorded=None):
    """Train (unless a baseline) and probe one (variant, seed); return its record. With a `test`
    beton, the same probe (fitted on --train with the same seed) is scored on it too. A `recorded`
    step is neither trained nor probed on --val again: only its test scores are added."""
    folder = os.path.join(runs_dir, run_folder_name(name, seed))
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "probe.log")
    probe = probe_command(name, folder, runs_dir, base_model)

    def probe_on(beton, out):  # -> (seconds, probe.json's top1, knn_top1)
        seconds = run_logged([*probe, f"--eval.train_dataset={args.train}", f"--eval.val_dataset={beton}",
                              f"--eval.seed={seed}", f"--eval.out={out}", "--logging.progress=0",
                              *args.probe_set.split(), *args.speed_set.split()], log)
        with open(out) as f:
            scored = json.load(f)
        return seconds, scored["top1"], scored["knn_top1"]

    if recorded is None:
        record = {"seed": seed, "overrides": variants.get(name, [])}
        if name not in BASELINES:
            train_args = ["hjepa/train.py", "--config-file", args.config, f"--data.train_dataset={args.train}",
                          f"--data.val_dataset={args.val}", f"--logging.folder={runs_dir}",
                          f"--logging.run_name={os.path.basename(folder)}", "--training.resume=auto",
                          f"--training.seed={seed}", f"--data.seed={seed}", "--logging.progress=0",
                          *args.set.split(), *variants[name], *args.speed_set.split()]
            record["train_s"] = run_logged(train_args, os.path.join(folder, "train.log"))
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                last = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r][-1]  # a step line, not an epoch's
            record["steps"], record["final_loss"] = last["step"], last["loss"]
        record["probe_s"], record["top1"], record["knn_top1"] = probe_on(args.val, os.path.join(folder, "probe.json"))
    else:
        record = dict(recorded)
    if test:
        record["test_probe_s"], record["test_top1"], record["test_knn_top1"] = probe_on(
            test, os.path.join(folder, "probe_test.json"))
        record["test"] = test
    return record


def print_tables(runs, variants, scored_on=None):
    """Print and return (summary table, reference variant, paired table) of recorded runs: the baselines
    and `variants` (in that order), then each variant minus the first one, paired by seed. `scored_on`
    names the beton the scores come from in a heading (the test beton's tables)."""
    table = summarize(runs, [*BASELINES, *variants])
    reference = variants[0]
    paired = paired_differences(runs, variants, reference)
    if scored_on:
        print(f"\nscored on {scored_on} (the same probes)")
    print("\n" + format_table(table))
    if paired:
        print(f"\nminus '{reference}', paired by seed (p: sign-flip test)\n" + format_table(paired, signed=True))
    return table, reference, paired


def merged_runs(folders):
    """(runs, variant names in order of first appearance) recorded in several ablation folders. They
    must have trained and probed on the same betons; a (variant, seed) recorded in two is refused,
    except a baseline that measured the same (each folder probes random init and the pixels itself)."""
    runs, variants, overrides, first, configs = {}, [], {}, None, set()
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise UserError(f"no results.json in {folder}: not an ablation folder")
        with open(path) as f:
            results = json.load(f)
        settings = results.get("settings", {})
        shared = {key: settings.get(key) for key in ("train", "val", "set", "probe_set")}
        if first is not None and shared != first:
            differ = ", ".join(f"{k} {shared[k]!r} against {first[k]!r}" for k in shared if shared[k] != first[k])
            raise UserError(f"{folder} was run with other settings than {folders[0]} ({differ}): its runs do "
                            "not measure the same thing")
        first = first or shared
        for key, record in results.get("runs", {}).items():
            name = key.rsplit("|", 1)[0]
            if key in runs and name in BASELINES and all(runs[key][m] == record[m] for m in ("top1", "knn_top1")):
                # Every folder probes the baselines at its seeds: the same measurement, kept once, with the
                # test-beton scores of whichever folder scored it there (the first folder's, if both did).
                runs[key] = {**record, **runs[key]}
                continue
            if key in runs:
                raise UserError(f"{folder} records {key} again: a (variant, seed) may come from one folder only")
            if overrides.setdefault(name, record.get("overrides")) != record.get("overrides"):
                raise UserError(f"variant '{name}' has overrides {record.get('overrides')} in {folder} but "
                                f"{overrides[name]} in an earlier folder")
            runs[key] = record
        names = results.get("variants") or {k.rsplit("|", 1)[0]: None for k in results.get("runs", {})}
        variants += [name for name in names if name not in variants and name not in BASELINES]
        seeds = sorted({int(k.rsplit("|", 1)[1]) for k in results.get("runs", {})})
        config = f"{settings.get('config')} (sha256 {settings.get('config_sha256', 'not recorded')[:12]})"
        configs.add(settings.get("config_sha256"))
        print(f"{folder}: seeds {seeds}, commit {results.get('commit', '?')[:12]}, config {config}")
    if len(configs) > 1:
        print("note: the folders' base configs resolve to different values (or one is not recorded); the "
              "variants' own overrides are the same in all of them")
    if not variants:
        raise UserError("the folders record no trained variant")
    return runs, variants


@exit_on_user_error
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report:
        runs, variants = merged_runs(args.report)
        tables = print_tables(runs, variants)
        test, tested = on_test_set(runs)
        if tested:
            print_tables(tested, variants, scored_on=test)
        return tables
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = parse_variants(args.variant, args.variants)
    for path in (args.config, args.train, args.val, *([args.test] if args.test else [])):
        if not os.path.isfile(path):
            raise UserError(f"file not found: {path}")
    base = load_config([args.config], argv=args.set.split())  # checks the base settings before any run
    base_model = {"arch": base["model.arch"], "patch_size": base["model.patch_size"],
                  "image_size": base["data.image_size"]}
    for name, overrides in variants.items():
        load_config([args.config], argv=[*args.set.split(), *overrides])  # a typo fails now, not in run 7
    # The config's resolved values, not only its path: an edited cpu_demo.yaml must not resume into
    # runs trained with the old one.
    settings = {"config": args.config, "config_sha256": config_digest(base), "train": os.path.abspath(args.train),
                "val": os.path.abspath(args.val), "set": args.set, "probe_set": args.probe_set}
    # The runs start in the repository's folder: paths given relative to the caller's folder must not move.
    for name in ("config", "train", "val", "out", *(["test"] if args.test else [])):
        setattr(args, name, os.path.abspath(getattr(args, name)))

    results, results_path = load_results(args.out)
    results["path"] = results_path
    check_recorded(results, variants, settings)
    results.update(settings=settings, seeds=seeds, variants=variants, machine=cpu_model(),
                   cpus=os.cpu_count(), commit=git_commit(REPO))
    plan = plan_runs(variants, seeds)
    todo = pending(plan, results, args.test)
    recorded = sum(result_key(name, seed) in results["runs"] for name, seed in plan)
    rescore = sum(result_key(name, seed) in results["runs"] for name, seed in todo)
    print(f"{len(variants)} variants x {len(seeds)} seeds + random init and raw pixels: {recorded} recorded, "
          f"{len(todo) - rescore} to run{f', {rescore} recorded to score on the test beton' if rescore else ''} "
          f"(logs under {os.path.join(args.out, 'runs')})", flush=True)

    from tqdm import tqdm

    # Runs are subprocesses, so threads suffice to keep --jobs of them going; results.json is written
    # from this thread only, after each finished run.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool, \
            tqdm(total=len(todo), desc="ablation", unit="run", disable=args.no_progress, dynamic_ncols=True) as bar:
        futures = {pool.submit(run_step, name, seed, args=args, variants=variants, base_model=base_model,
                               runs_dir=os.path.join(args.out, "runs"), test=args.test,
                               recorded=results["runs"].get(result_key(name, seed))): (name, seed)
                   for name, seed in todo}
        failures = []
        for future in as_completed(futures):
            name, seed = futures[future]
            try:
                results["runs"][result_key(name, seed)] = future.result()
            except UserError as e:  # the others go on; a rerun retries this one
                failures.append(str(e))
                continue
            save_results(results, results_path)
            bar.set_postfix_str(f"done: {name} seed {seed}")
            bar.update()
    if failures:
        raise UserError(f"{len(failures)} run(s) failed, the rest are recorded in {results_path}: " + "; ".join(failures))

    chosen = {k: v for k, v in results["runs"].items() if int(k.rsplit("|", 1)[1]) in seeds}
    scored = [("", args.val, chosen)]
    if args.test:  # every chosen run now carries a score on this test beton
        scored.append(("_test", args.test, on_test_set(chosen)[1]))
    written = [results_path]
    for suffix, beton, runs in scored:
        table, reference, paired = print_tables(runs, list(variants), scored_on=suffix and beton)
        results["summary" + suffix] = {name: {m: {"mean": v[0], "std": v[1], "n": v[2]} for m, v in row.items()}
                                       for name, row in table.items()}
        results["paired" + suffix] = {"reference": reference, **{
            name: {m: {"mean": v[0], "std": v[1], "n": v[2], "per_seed": v[3], "p_sign_flip": v[4]}
                   for m, v in row.items()}
            for name, row in paired.items()}}
        png = os.path.join(args.out, f"ablation{suffix}.png")
        plot_table(table, png, f"{os.path.basename(args.train)} -> {os.path.basename(beton)} | {args.config} "
                               f"{args.set} | seeds {args.seeds}")
        written.append(png)
    save_results(results, results_path)
    print(f"\nwrote {', '.join(written)}", flush=True)
    return results


if __name__ == "__main__":
    main()
