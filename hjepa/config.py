"""Every fastargs Section of the project, and the strictness fastargs 1.2.0 lacks.

fastargs silently ignores unknown keys, reads `bool("False")` as True, exits with status 0 on a
validation failure and reads `sys.argv` itself. `load_config` fixes all four: unknown keys are errors
naming the closest valid key, booleans accept only 0/1/true/false, validation failures raise
`UserError` (exit status 1 at the entry points), and tests pass arguments explicitly. Config files
layer: a file may name the files it builds on (`inherit: base.yaml`) and hold only what differs, and
`--config-file` may be repeated; later layers win. Library code never reads the config: entry points
and `build_*` functions do, and each entry point names the keys it reads (its `--help` lists those).
"""
import difflib
import json
import os
import sys

import yaml
from fastargs import Config, Param, Section, set_current_config

from hjepa.checkers import Boolean, Choice, Integer, Number, NumberList, NumberPair, Text
from hjepa.errors import UserError

def _p(checker, desc, default=None, required=False):
    return Param(checker, desc, default=default, required=required)


# ----------------------------------------------------------------------------------------------
# Sections


def _declare_sections(cfg):
    def section(name, desc):
        return Section(name, desc, config_descriptor=cfg)

    section("data", "training/eval data through FFCV").params(
        train_dataset=_p(Text(), "path to the training .beton", default=""),
        val_dataset=_p(Text(), "path to the validation .beton (k-NN monitor)", default=""),
        image_size=_p(Integer(16, 1024), "crop side in pixels fed to the model", default=224),
        crop_scale=_p(NumberPair(0.01, 1.0), "random-resized-crop area fraction range (I-JEPA: 0.3,1.0)",
                      default=(0.8, 1.0)),
        flip=_p(Boolean(), "random horizontal flip", default=True),
        color_jitter=_p(Number(0.0, 1.0), "brightness/contrast/saturation jitter strength, 0 disables", default=0.0),
        batch_size=_p(Integer(1), "images per step per GPU (per process)", default=256),
        num_workers=_p(Integer(1, 256), "FFCV decoding threads per process", default=8),
        in_memory=_p(Boolean(), "1: the beton fits in RAM: mmap it, the OS caches it (FFCV os_cache); "
                     "0: FFCV's own page reads, for betons larger than RAM (use order=quasi_random)", default=True),
        order=_p(Choice("random", "quasi_random", "weighted", "balanced"),
                 "traversal order; weighted/balanced use data.mixture", default="random"),
        seed=_p(Integer(0), "seed of the sample order and augmentations", default=0),
        mixture=_p(Text(), "member weights, e.g. imagenet100:0.6,stl10:0.25,cifar100:0.15", default=""),
        epoch_samples=_p(Integer(-1), "samples per epoch for weighted orders; -1 = sum of member sizes", default=-1),
    )
    section("model", "H-JEPA model").params(
        arch=_p(Choice("vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large"),
                  "encoder size (vit_micro: 96 wide, 4 deep, for CPU demos/tests)", default="vit_small"),
        patch_size=_p(Integer(1, 64), "patch side in pixels", default=16),
        drop_path=_p(Number(0.0, 1.0), "stochastic depth rate of the context encoder", default=0.0),
        predictor_embed_dim=_p(Integer(8), "predictor width", default=384),
        predictor_depth=_p(Integer(1), "predictor blocks (I-JEPA: 12)", default=6),
        predictor_num_heads=_p(Integer(1), "predictor attention heads", default=6),
        num_levels=_p(Integer(1, 6), "hierarchy levels; level h pools 2^h x 2^h patches", default=3),
        level_weights=_p(NumberList(), "relative loss weight per level, comma-separated (normalised to sum to 1)",
                         default="1.0,0.5,0.25"),
        level_depths=_p(NumberList(), "target-encoder block per level (1-based), empty = final block", default=""),
        loss=_p(Choice("smooth_l1", "mse"), "per-level regression loss", default="smooth_l1"),
        normalize_levels=_p(Boolean(), "layer-norm each pooled level-h>=1 target (prediction scaled alike)",
                            default=True),
        level_heads=_p(Boolean(), "each level h>=1 predicts through its own linear head (else all levels "
                       "pool the one prediction; intermediate-depth levels always have a head)", default=False),
        level_windows=_p(Choice("block", "grid"), "where level h's 2^h x 2^h windows lie: inside each target block, "
                         "or on the patch grid with the whole window's mean as target (needs level_heads)",
                         default="block"),
        var_weight=_p(Number(0.0), "weight of VICReg's variance term (std >= 1 per dim over the batch) on each "
                      "image's mean context embedding; 0 = off (I-JEPA)", default=0.0),
        cov_weight=_p(Number(0.0), "weight of VICReg's covariance term (squared off-diagonal covariances / D) on "
                      "the same embeddings; 0 = off", default=0.0),
        target_blocks=_p(Integer(1), "the final-depth target is the mean of the last K target-encoder blocks' "
                         "layer-normed outputs (data2vec); 1 = the final block only (I-JEPA)", default=1),
    )
    section("masking", "I-JEPA multi-block masks on the patch grid").params(
        num_targets=_p(Integer(1, 16), "target blocks per image", default=4),
        target_scale=_p(NumberPair(0.0, 1.0), "target block area fraction range", default=(0.15, 0.2)),
        target_aspect=_p(NumberPair(0.01, 100.0), "target block aspect ratio (h/w) range", default=(0.75, 1.5)),
        context_scale=_p(NumberPair(0.0, 1.0), "context block area fraction range", default=(0.85, 1.0)),
        context_aspect=_p(Number(0.01, 100.0), "context block aspect ratio", default=1.0),
        allow_overlap=_p(Boolean(), "let the context keep target patches", default=False),
        min_keep=_p(Integer(1), "minimum patches in any block", default=10),
    )
    section("optim", "AdamW, schedules").params(
        lr=_p(Number(0.0), "peak learning rate per 256 images (scaled by total batch / 256)", default=5e-4),
        warmup_epochs=_p(Number(0.0), "linear warmup length in epochs", default=10),
        warmup_start_factor=_p(Number(0.0, 1.0), "warmup starts at this fraction of the peak lr", default=0.2),
        min_lr=_p(Number(0.0), "final learning rate of the cosine (absolute)", default=1e-6),
        weight_decay=_p(Number(0.0), "weight decay at step 0 (cosine to final_weight_decay)", default=0.04),
        final_weight_decay=_p(Number(0.0), "weight decay at the last step", default=0.4),
        beta1=_p(Number(0.0, 1.0), "AdamW beta1", default=0.9),
        beta2=_p(Number(0.0, 1.0), "AdamW beta2", default=0.95),
        clip_grad=_p(Number(0.0), "max global grad norm, 0 disables", default=0.0),
        ema_start=_p(Number(0.0, 1.0), "target-encoder EMA momentum at step 0", default=0.996),
        ema_end=_p(Number(0.0, 1.0), "target-encoder EMA momentum at the last step", default=1.0),
    )
    section("training", "run length, checkpoints").params(
        epochs=_p(Integer(1), "training epochs", default=100),
        max_steps=_p(Integer(-1), "stop after this many steps in total (-1 = no limit)", default=-1),
        seed=_p(Integer(0), "seed of model init and masks", default=0),
        checkpoint_every=_p(Integer(1), "save a checkpoint every this many epochs", default=10),
        keep_checkpoints=_p(Integer(0), "epoch checkpoints kept besides checkpoint.pt", default=2),
        resume=_p(Text(), "checkpoint path, or 'auto' for <run folder>/checkpoint.pt", default=""),
        deterministic=_p(Boolean(), "deterministic algorithms (slower; for exact resume tests)", default=False),
    )
    section("hardware", "devices and speed").params(
        device=_p(Choice("auto", "cpu", "cuda"), "auto = cuda when present", default="auto"),
        distributed=_p(Boolean(), "torch.distributed via torchrun (NCCL on GPU, gloo on CPU)", default=False),
        compile=_p(Boolean(), "torch.compile the model", default=False),
        compile_mode=_p(Choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        "torch.compile mode; reduce-overhead replays the step as CUDA graphs, max-autotune also "
                        "benchmarks kernel choices (matmul epilogue fusion) while compiling", default="default"),
        bf16=_p(Boolean(), "bf16 autocast on CUDA (always fp32 on CPU)", default=True),
        peak_tflops=_p(Number(0.0), "one accelerator's peak dense TFLOP/s, for MFU per device (A100 bf16: 312)", default=312.0),
        num_threads=_p(Integer(0), "torch intra-op threads (CPU training), 0 = all cores", default=0),
    )
    section("logging", "run folder and metrics").params(
        folder=_p(Text(), "parent folder of run folders", default="runs"),
        run_name=_p(Text(), "run folder name; empty = <time>-<id>", default=""),
        log_every=_p(Integer(1), "steps between metric lines (each is a device sync)", default=50),
        eval_every=_p(Integer(0), "epochs between k-NN monitors, 0 disables", default=0),
        progress=_p(Boolean(), "progress bars", default=True),
        plots=_p(Boolean(), "draw PNG curves and mask grids into the run folder", default=True),
    )
    section("eval", "linear probe, k-NN and export of a frozen encoder").params(
        checkpoint=_p(Text(), "training checkpoint (.pt)", default=""),
        train_dataset=_p(Text(), "beton the probe is trained on", default=""),
        val_dataset=_p(Text(), "beton the probe is evaluated on", default=""),
        encoder=_p(Choice("target", "context"), "which encoder of the checkpoint", default="target"),
        last_k_blocks=_p(Integer(1), "concatenate pooled outputs of the last k blocks", default=1),
        tokens=_p(Choice("mean", "grid"), "probe features: the mean token (I-JEPA's probe) or the whole token "
                                          "grid, flattened (to see what pooling discards)", default="mean"),
        random_init=_p(Boolean(), "probe an untrained encoder of the same architecture", default=False),
        pixels=_p(Boolean(), "probe the eval images' normalised pixels, flattened: the baseline features should beat",
                  default=False),
        epochs=_p(Integer(1), "probe training epochs (more when needed to reach min_steps)", default=100),
        min_steps=_p(Integer(0), "probe trains at least this many SGD steps (small sets need many epochs)",
                     default=3000),
        lr=_p(Number(0.0), "probe learning rate (SGD, cosine)", default=0.5),
        weight_decay=_p(Number(0.0), "probe weight decay", default=0.0),
        batch_size=_p(Integer(1), "probe batch size on cached features", default=256),
        extract_batch_size=_p(Integer(1), "batch size for feature extraction", default=256),
        num_workers=_p(Integer(1, 256), "FFCV threads for feature extraction", default=8),
        image_size=_p(Integer(0), "eval crop side; 0 = the checkpoint's training size", default=0),
        knn_k=_p(Integer(1), "neighbours for k-NN", default=20),
        knn_temperature=_p(Number(0.0), "k-NN vote temperature", default=0.07),
        cache_dir=_p(Text(), "feature cache folder; empty = next to the checkpoint", default=""),
        out=_p(Text(), "output: the probe's results JSON, the export's .safetensors; empty = next to the checkpoint",
                default=""),
        seed=_p(Integer(0), "probe seed", default=0),
    )
    section("bench", "benchmarks").params(
        data_dir=_p(Text(), "ImageNet-style folder; empty = generate one", default=""),
        num_images=_p(Integer(1), "images to generate when no folder is given", default=2000),
        num_workers=_p(Integer(0), "worker processes/threads for every pipeline; 0 = all cores", default=0),
        batch_size=_p(Integer(1), "batch size for every pipeline", default=64),
        epochs=_p(Integer(1), "timed epochs (after one warm-up epoch)", default=2),
        repeats=_p(Integer(1), "loader_throughput: timed windows of our loader, each paired with a ceiling "
                               "measurement; medians reported", default=3),
        steps=_p(Integer(1), "timed training steps", default=20),
        warmup_steps=_p(Integer(0), "untimed steps first (compilation, autotuning)", default=5),
        out=_p(Text(), "JSON results file", default=""),
        work_dir=_p(Text(), "scratch folder for generated data and betons", default="bench_data"),
    )
    section("cfg", "dataset writers").params(
        data_dir=_p(Text(), "source dataset folder", default=""),
        split=_p(Text(), "split to write (train, val, test, unlabeled, train+unlabeled)", default="train"),
        write_path=_p(Text(), "output .beton path", default=""),
        short_side=_p(Integer(8), "shorter side stored, pixels (torchvision Resize(short_side); never enlarged)",
                      default=256),
        max_side=_p(Integer(0), "cap on the longer side stored, pixels, after short_side (panoramas); 0 = none",
                    default=0),
        jpeg_quality=_p(Integer(1, 100), "JPEG quality of stored images", default=90),
        write_mode=_p(Choice("jpg", "raw", "proportion"), "image storage mode", default="jpg"),
        compress_probability=_p(Number(0.0, 1.0), "JPEG fraction in proportion mode", default=0.5),
        num_workers=_p(Integer(1, 256), "writer processes", default=max(1, os.cpu_count() or 1)),
        chunk_size=_p(Integer(1), "samples per writer chunk", default=100),
        subset=_p(Integer(-1), "write N samples spread evenly over the (class-sorted) source, -1 = all", default=-1),
        allow_missing_classes=_p(Boolean(), "write ImageNet-100 even when classes are absent", default=False),
        max_bad_fraction=_p(Number(0.0, 1.0), "fail when more unreadable images than this", default=0.001),
        download=_p(Boolean(), "fetch CIFAR/STL archives with torchvision's helper", default=False),
        members=_p(Text(), "multi.py: name=path.beton,name=path.beton,...", default=""),
        per_class=_p(Integer(0), "fashion_mnist.py: first K images of each class, 0 = all", default=0),
        skip_per_class=_p(Integer(0), "fashion_mnist.py: skip the first K images of each class first "
                          "(a subset disjoint from one written with per_class <= K)", default=0),
        image_size=_p(Integer(0, 1024), "fashion_mnist.py: enlarge to this side (bicubic), 0 = native 28",
                      default=0),
    )


# ----------------------------------------------------------------------------------------------
# Loading


def known_keys(cfg):
    return sorted(".".join(path) for path in cfg.entries)


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# Keys that were removed, and what replaces them.
REMOVED_KEYS = {
    "cfg.max_resolution": "images are now stored by their shorter side: use cfg.short_side (and cfg.max_side "
                          "to cap the longer side)",
    **{f"{section}.{name}_{end}": f"ranges are one key with two values: use {section}.{name}: [lo, hi] "
                                  f"(--{section}.{name}=lo,hi on the command line)"
       for section, name in (("data", "crop_scale"), ("masking", "target_scale"), ("masking", "target_aspect"),
                             ("masking", "context_scale"))
       for end in ("min", "max")},
}


def _check_known(cfg, flat, where):
    valid = known_keys(cfg)
    for key in flat:
        if key in REMOVED_KEYS:
            raise UserError(f"config key '{key}' in {where} was removed: {REMOVED_KEYS[key]}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{key}' in {where}{hint}")


def _read_config_file(path):
    """The mapping a YAML (or JSON) config file holds, unflattened; {} for an empty file."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f)  # JSON is YAML too; safe_load never builds Python objects
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def config_layers(path, _chain=()):
    """[(file, {key: value})] of a config file and every file it inherits, parents first.

    `inherit: parent.yaml` (or a list of files) names files relative to the inheriting one; each file
    appears once, at its first position, so a parent shared by two branches is not applied twice.
    """
    if os.path.realpath(path) in [os.path.realpath(p) for p in _chain]:
        raise UserError("config files inherit in a cycle: " + " -> ".join([*_chain, path]))
    tree = dict(_read_config_file(path))
    parents = tree.pop("inherit", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise UserError(f"config file {path}: inherit must be a file path or a list of file paths")
    layers, seen = [], set()
    for parent in parents:
        parent_path = os.path.join(os.path.dirname(path), parent)
        if not os.path.isfile(parent_path):
            raise UserError(f"config file {parent_path} (inherited by {path}) not found")
        for layer in config_layers(parent_path, (*_chain, path)):
            if os.path.realpath(layer[0]) not in seen:
                seen.add(os.path.realpath(layer[0]))
                layers.append(layer)
    return layers + [(path, _flatten(tree))]


def parse_argv(argv):
    """Split `--config-file F` / `-C F` and `--section.param=value` (or `--section.param value`)."""
    config_files, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config-file", "-C") or arg.startswith("--config-file="):
            if "=" in arg:
                config_files.append(arg.split("=", 1)[1])
            elif i + 1 < len(argv):
                config_files.append(argv[i + 1])
                i += 1
            else:
                raise UserError(f"{arg} needs a file path")
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = value
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides[arg[2:]] = argv[i + 1]
            i += 1
        else:
            raise UserError(f"cannot parse argument '{arg}': use --section.param=value or --config-file FILE")
        i += 1
    return config_files, overrides


def load_config(config_files=(), overrides=None, argv=None):
    """Build, check and return a fresh fastargs Config (also made the current one for @param).

    Precedence: defaults < config files (in order, each after the files it inherits) < overrides <
    argv. Never reads sys.argv or the environment by itself. Raises UserError for an unknown key or
    an invalid value.
    """
    if isinstance(config_files, str):
        config_files = [config_files]
    config_files = list(config_files)
    cli = {}
    if argv is not None:
        argv_files, cli = parse_argv(list(argv))
        config_files += argv_files
    cfg = Config()
    _declare_sections(cfg)
    for path in config_files:
        for layer_path, flat in config_layers(path):
            _check_known(cfg, flat, layer_path)
            cfg.collect(flat)
    for where, flat in (("overrides", overrides or {}), ("command line", cli)):
        _check_known(cfg, flat, where)
        cfg.collect(flat)
    _validate(cfg)
    set_current_config(cfg)
    return cfg


def _validate(cfg):
    errors = cfg.validate(mode="errordict")
    if errors:
        problems = []
        for path, _ in errors.items():
            key, param = ".".join(path), cfg.entries[path]
            got = cfg.content.get(path)
            problems.append(f"{key}={got!r} is invalid (expected {param.checker.help()})"
                            if got is not None else f"{key} is required")
        raise UserError("; ".join(problems))


def is_read(key, reads):
    """Whether `key` ('section.param') is among `reads`: section names and/or full keys; None = all."""
    return reads is None or any(key == r or key.startswith(r + ".") for r in reads)


def help_text(description, reads=None):
    """A tool's --help: its docstring, then the params it reads, grouped by section."""
    cfg = Config()
    _declare_sections(cfg)
    lines = [description.rstrip(), "",
             "usage: [--config-file FILE ...] [--section.param=value ...] [--print-config] [--help]",
             "  --config-file FILE (or -C FILE) may repeat: later files win; a file may `inherit:` others.",
             "  --print-config prints the merged config (YAML, loadable with --config-file) and exits."]
    shown_section = None
    for key in known_keys(cfg):
        if not is_read(key, reads):
            continue
        path = tuple(key.split("."))
        param = cfg.entries[path]
        if path[0] != shown_section:
            shown_section = path[0]
            lines += ["", f"{shown_section}: {param.section.desc}"]
        lines.append(f"  --{key:<34} {param.desc} [{param.checker.help()}; default {param.default!r}]")
    return "\n".join(lines)


def config_from_cli(description, argv=None, reads=None):
    """Entry points: parse argv (sys.argv[1:] by default) and return the config.

    `reads` names the sections and/or keys the tool reads: `--help` lists only those, and
    `--print-config` prints their merged values as YAML; both exit with status 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(description, reads))
        sys.exit(0)
    if "--print-config" in argv:
        cfg = load_config(argv=[a for a in argv if a != "--print-config"])
        print(config_yaml(cfg, reads), end="")
        sys.exit(0)
    return load_config(argv=argv)


def config_as_dict(cfg, sections=None):
    """The resolved config as {section: {param: value}}, optionally only some sections or keys."""
    tree = {}
    for path in cfg.entries:
        if sections is not None and not is_read(".".join(path), sections):
            continue
        tree.setdefault(path[0], {})[".".join(path[1:])] = cfg[path]
    return tree


def config_yaml(cfg, sections=None):
    """The resolved config as YAML that --config-file reads back to the same values."""
    return yaml.safe_dump(config_as_dict(cfg, sections), sort_keys=False, default_flow_style=False)


def format_config(cfg, sections=None):
    """A two-column table of the resolved values, for printing at start."""
    rows = [(f"{s}.{k}", v) for s, params in config_as_dict(cfg, sections).items() for k, v in params.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v!r}" for k, v in rows)


def save_config(cfg, path, sections=None):
    """Write the resolved config as JSON (params.json next to every output)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(config_as_dict(cfg, sections), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
