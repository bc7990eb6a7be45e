"""Checkpoints: written atomically, read without pickle code execution, checked against the model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
`torch.load(weights_only=True)` reads it (no arbitrary code runs from an untrusted file):
    {"format": FORMAT, "model_config": build_model kwargs, "context_encoder", "target_encoder",
     "predictor", "level_heads": state dicts, "optimizer": state dict, "step", "epoch",
     "config": {section: {param: value}}, "rng": {...}, "sampler": {...}}
"""
import glob
import os
import re

import torch

from hjepa.errors import UserError
from hjepa.model import ModelConfig
from hjepa.vit import build_encoder

FORMAT = "hjepa-checkpoint-v1"
MODEL_PARTS = ("context_encoder", "target_encoder", "predictor", "level_heads")


def save_checkpoint(state, path):
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it: all the same to a user
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a readable hjepa checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an hjepa checkpoint (no '{FORMAT}' format tag)")
    return ckpt


def load_training_checkpoint(path):
    """(checkpoint, model_config) of a checkpoint train.py wrote; one-line errors for anything else."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model_config", "context_encoder", "target_encoder") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a training checkpoint")
    model_config = ckpt["model_config"]
    absent = [k for k in ("arch", "patch_size", "image_size") if k not in model_config]
    if absent:
        raise UserError(f"{path}: model_config lacks {', '.join(absent)}")
    return ckpt, model_config


def encoder_from_checkpoint(ckpt, role, path, image_size=None):
    """The `role` ('target' or 'context') encoder of a training checkpoint, with its weights, for
    square `image_size` px images (default: the training size). `path` only names the file in errors."""
    model_config = ckpt["model_config"]
    image_size = image_size or model_config["image_size"]
    encoder = build_encoder(model_config["arch"], patch_size=model_config["patch_size"], image_size=image_size)
    key = f"{role}_encoder"
    state = dict(ckpt[key])
    trained_grid = model_config["image_size"] // model_config["patch_size"]
    pos_embed = state.get("pos_embed")
    if image_size != model_config["image_size"] and pos_embed is not None and pos_embed.shape[1] == trained_grid ** 2:
        # hjepa.vit's pos_embed is a fixed sin-cos buffer, a function of the grid size only:
        # another resolution takes the one built for its grid.
        state["pos_embed"] = encoder.pos_embed
    load_state_strict(encoder, state, f"{key} (recorded as {model_config['arch']}, patch "
                                      f"{model_config['patch_size']})", path)
    return encoder


def architecture_differences(expected_config, found_config):
    """The model_config keys whose values differ, as 'key: expected X, checkpoint has Y' strings.

    The checkpoint's record is read through ModelConfig first: a key added to the model section
    after it was written takes its default (the architecture that checkpoint was trained with), and a
    key this version does not know is a UserError."""
    found_config = ModelConfig.from_record(found_config).as_record()
    keys = sorted(set(expected_config) | set(found_config))
    return [f"{k}: run has {expected_config.get(k)!r}, checkpoint has {found_config.get(k)!r}"
            for k in keys if expected_config.get(k) != found_config.get(k)]


def load_state_strict(module, state_dict, what, path):
    """load_state_dict that turns a mismatch into one line listing the differing keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append("shape of " + _few([f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                                             for k in shapes]))
        raise UserError(f"{path}: {what} does not match this architecture: " + "; ".join(parts))
    module.load_state_dict(state_dict)


def _few(items, n=4):
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def epoch_checkpoint_path(run_dir, epoch):
    return os.path.join(run_dir, f"checkpoint_ep{epoch:04d}.pt")


def prune_epoch_checkpoints(run_dir, keep):
    """Delete all but the newest `keep` epoch checkpoints (checkpoint.pt, the latest, always stays)."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint_ep*.pt")):
        match = re.search(r"checkpoint_ep(\d+)\.pt$", path)
        if match:
            found.append((int(match.group(1)), path))
    for _, path in sorted(found)[: max(0, len(found) - keep)]:
        os.remove(path)


def remove_partial_checkpoints(run_dir):
    """Delete the temporaries of saves that were killed midway (`*.pt.tmp.<pid>`): never loaded, but each
    is as big as a checkpoint, and a run preempted again and again would fill its disk with them."""
    for path in glob.glob(os.path.join(run_dir, "checkpoint*.pt.tmp.*")):
        os.remove(path)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """checkpoint.pt (always the latest) at every save, plus an epoch checkpoint every `every_epochs`
    epochs of which the newest `keep` stay. `make_state(step=, epoch=)` builds what is saved. Only an
    enabled checkpointer (rank 0) writes, and a step is written once."""

    def __init__(self, run_dir, make_state, *, steps_per_epoch, every_epochs, keep, enabled, saved_step=None):
        self.run_dir, self.make_state = run_dir, make_state
        self.steps_per_epoch, self.every_epochs, self.keep = steps_per_epoch, every_epochs, keep
        self.enabled, self.saved_step = enabled, saved_step

    def save(self, step, epoch):
        if not self.enabled or self.saved_step == step:
            return
        self.saved_step = step
        state = self.make_state(step=step, epoch=epoch)
        save_checkpoint(state, os.path.join(self.run_dir, "checkpoint.pt"))
        epochs_done, mid_epoch = divmod(step, self.steps_per_epoch)
        if not mid_epoch and epochs_done % self.every_epochs == 0:
            save_checkpoint(state, epoch_checkpoint_path(self.run_dir, epochs_done))
            prune_epoch_checkpoints(self.run_dir, self.keep)

    def due(self, epoch, epochs):
        """Whether the end of `epoch` (0-based) of `epochs` is a checkpoint point."""
        return (epoch + 1) % self.every_epochs == 0 or epoch + 1 == epochs
