"""What bench/device_check.py's training sections share: the train loader over the generated beton and
a trainer that steps a model as hjepa/train.py does (optionally on target blocks cut to their size)."""
import copy
import dataclasses
import os

import torch

from hjepa.engine import autocast_dtype, build_optimizer, compile_forward, masks_to_device, train_step
from hjepa.flops import train_flops_per_image
from hjepa.loaders import build_train_loader, normalize_images
from hjepa.masks import sample_masks, unpadded
from hjepa.model import build_model
from hjepa.sections import data_config, mask_config, model_config, optim_config

IN100_TRAIN_IMAGES = 126_689  # the ImageNet-100 train split (README)


def train_loader(run, cfg):
    """One train loader, shared by the sections: each new FFCV Loader pays its numba compilation."""
    if "loader" not in run.kept:
        if "beton" not in run.kept:
            raise RuntimeError("no beton: the data section did not run")
        run.kept["loader"] = build_train_loader(dataclasses.replace(
            data_config(cfg), train_dataset=run.kept["beton"], num_workers=run.args.num_workers or os.cpu_count(),
            in_memory=True, order="random", seed=0))
    return run.kept["loader"]




class Trainer:
    """A model, its optimizer and compiled forward, stepped as hjepa/train.py steps them."""

    def __init__(self, run, cfg, exact_targets=False):
        self.cfg, self.device, self.batch = cfg, run.device, cfg["data.batch_size"]
        self.exact_targets = exact_targets  # blocks cut to their real size, that dimension dynamic
        torch.manual_seed(0)
        self.model = build_model(model_config(cfg)).to(self.device)
        self.initial_state = copy.deepcopy(self.model.state_dict())
        self.optimizer = self.new_optimizer()
        self.compile_mode = cfg["hardware.compile_mode"]
        self.forward = compile_forward(self.model, self.compile_mode, backend=run.size["compile_backend"])
        self.amp_dtype = autocast_dtype(self.device, cfg["hardware.bf16"])
        self.masking, self.grid = mask_config(cfg), self.model.grid_size
        self.flops = train_flops_per_image(self.model.model_config, masking=self.masking,
                                           num_patches=self.grid[0] * self.grid[1])

    def new_optimizer(self):
        optim = optim_config(self.cfg)  # as hjepa/train.py builds it (each step's schedule sets lr and wd)
        return build_optimizer(self.model, lr=optim.peak_lr(self.batch), weight_decay=optim.weight_decay,
                               betas=(optim.beta1, optim.beta2))

    def masks(self, step):
        return sample_masks(self.masking, batch_size=self.batch, grid_size=self.grid, seed=0, step=step)

    def step(self, step, images, schedule=None):
        masks = self.masks(step)  # (B, Nc), (T, B, Nt), (Nt, 2): the same shapes every step, unless cut
        if self.exact_targets:
            masks = unpadded(masks)
        masks = masks_to_device(masks, self.device)
        if self.exact_targets:  # one graph for every block size
            torch._dynamo.mark_dynamic(masks.tgt_idx, 2)
            torch._dynamo.mark_dynamic(masks.tgt_pos, 0)
        x = normalize_images(images, self.device, self.amp_dtype or torch.float32)  # (B, 3, H, W)
        return train_step(self.model, self.forward, self.optimizer, x, masks,
                          **(schedule or dict(lr=1e-4, weight_decay=0.05, momentum=0.996)), amp_dtype=self.amp_dtype)
