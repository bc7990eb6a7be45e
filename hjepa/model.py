"""H-JEPA: I-JEPA's context encoder / EMA target encoder / predictor, with a hierarchy of coarser targets.

Level 0 is I-JEPA's objective: regress the layer-normed final target-encoder features at the
target patches. Level h >= 1 average-pools prediction and target over 2^h x 2^h windows of each
target block on the 2-D patch grid, so it asks for the gist of a region. Optionally, level h takes
its target from an intermediate target-encoder block (`level_depths`) and then reads its
prediction through its own linear head on the predictor's hidden states.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from hjepa.errors import UserError
from hjepa.predictor import Predictor
from hjepa.vit import INIT_STD, build_encoder, gather_tokens, trunc_normal_

LOSSES = {"smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}  # both: mean over positions and dims


def gather_target_blocks(features, tgt_idx):
    """features (B, N, D), tgt_idx (T, B, Nt) -> (T*B, Nt, D), target-major like the predictor."""
    num_targets, batch_size, num_target_tokens = tgt_idx.shape
    idx = tgt_idx.permute(1, 0, 2).reshape(batch_size, num_targets * num_target_tokens)
    blocks = gather_tokens(features, idx).reshape(batch_size, num_targets, num_target_tokens, -1)
    return blocks.transpose(0, 1).reshape(num_targets * batch_size, num_target_tokens, -1)


def pool_target_blocks(z, tgt_shape, level):
    """Average (T*B, th*tw, D) row-major target blocks over 2^level x 2^level windows of the 2-D grid
    -> (T*B, ceil(th/2^level) * ceil(tw/2^level), D).

    Pooling is on the (th, tw) grid, not over token order: tokens k and k+1 are not neighbours at a row
    end. avg_pool2d with ceil_mode and no padding divides a window hanging over the block edge by the
    number of real positions in it, so edge cells are means of real patches only (tested).
    """
    if level == 0:
        return z
    th, tw = tgt_shape
    window = 2 ** level
    grid = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], th, tw)  # (T*B, D, th, tw)
    pooled = F.avg_pool2d(grid, kernel_size=window, stride=window, ceil_mode=True)  # (T*B, D, th', tw')
    return pooled.flatten(2).transpose(1, 2)  # (T*B, th'*tw', D)


def std_across_batch(z, batch_size):
    """Collapse monitor: std over images of (T*B, Nt, D) features, averaged over targets, tokens, dims."""
    z = z.detach().float()
    return z.reshape(-1, batch_size, *z.shape[1:]).std(dim=1, correction=0).mean()


class LevelHeads(nn.Module):
    """One linear read-out per level whose target comes from an intermediate target-encoder block."""

    def __init__(self, levels, predictor_embed_dim, embed_dim):
        super().__init__()
        self.levels = list(levels)
        self.heads = nn.ModuleList(nn.Linear(predictor_embed_dim, embed_dim) for _ in self.levels)
        for head in self.heads:
            trunc_normal_(head.weight, INIT_STD)
            nn.init.zeros_(head.bias)

    def forward(self, hidden):  # (T*B, Nt, d) -> tuple of (T*B, Nt, D), one per entry of self.levels
        return tuple(head(hidden) for head in self.heads)


class HJEPA(nn.Module):
    def __init__(self, context_encoder, predictor, *, level_weights, level_depths, loss, level_heads=None):
        super().__init__()
        self.context_encoder = context_encoder
        self.target_encoder = copy.deepcopy(context_encoder)
        self.target_encoder.requires_grad_(False)
        for block in self.target_encoder.blocks:
            block.drop_path = 0.0  # targets are never stochastic, even while the model is in train mode
        self.predictor = predictor
        self.level_heads = level_heads
        self.level_weights = list(level_weights)
        # A buffer so the weighted sum needs no host-to-device copy each step; not part of any checkpoint.
        self.register_buffer("level_weight_tensor", torch.tensor(self.level_weights), persistent=False)
        self.level_depths = list(level_depths)  # 1-based target-encoder block per level
        self.loss_name = loss
        self.model_config = {}  # filled by build_model

    @property
    def grid_size(self):
        """(rows, cols) of the patch grid, as hjepa.masks.sample_masks takes it."""
        return (self.context_encoder.grid_size, self.context_encoder.grid_size)

    @property
    def num_levels(self):
        return len(self.level_weights)

    @torch.no_grad()
    def target_features(self, images, tgt_idx):
        """{depth: layer-normed target-encoder features at the target blocks (T*B, Nt, D)}.

        The final depth is the encoder output after its own norm, then layer_norm without affine over
        D, exactly I-JEPA's `F.layer_norm(target_encoder(imgs), (D,))`; intermediate depths layer-norm
        the residual stream after that block.
        """
        encoder = self.target_encoder
        if all(d == encoder.depth for d in self.level_depths):
            outputs = {encoder.depth: encoder.forward_features(images)}  # (B, N, D)
        else:
            blocks = encoder.forward_blocks(images)  # depth x (B, N, D)
            outputs = {d: blocks[d - 1] for d in self.level_depths}
            outputs[encoder.depth] = encoder.norm(blocks[-1])  # always present: the collapse monitor reads it
        return {d: gather_target_blocks(F.layer_norm(h, h.shape[-1:]), tgt_idx) for d, h in outputs.items()}

    def forward(self, images, ctx_idx, tgt_idx, tgt_shape):
        """images (B, 3, H, W) normalised; ctx_idx (B, Nc); tgt_idx (T, B, Nt); tgt_shape (th, tw)
        with th*tw == Nt. Returns dict(loss=scalar, level_losses=(L,) detached, target_std, pred_std)."""
        num_targets, batch_size, num_target_tokens = tgt_idx.shape
        th, tw = (int(s) for s in tgt_shape)
        if th * tw != num_target_tokens:
            raise ValueError(f"tgt_shape {(th, tw)} does not match {num_target_tokens} target tokens")

        # 1. targets (no grad): layer-normed target-encoder features at every target block
        z_tgt = self.target_features(images, tgt_idx)  # {depth: (T*B, Nt, D)}

        # 2. predict: encode the context tokens only, then every target block in one predictor call
        z_ctx = self.context_encoder(images, ctx_idx)  # (B, Nc, D)
        if self.level_heads is None:
            z_pred = self.predictor(z_ctx, ctx_idx, tgt_idx)  # (T*B, Nt, D)
            head_preds = {}
        else:
            z_pred, hidden = self.predictor(z_ctx, ctx_idx, tgt_idx, return_hidden=True)
            head_preds = dict(zip(self.level_heads.levels, self.level_heads(hidden)))

        # 3. loss per level on the 2-D-pooled blocks, weighted sum
        loss_fn = LOSSES[self.loss_name]
        level_losses = []
        for level, depth in enumerate(self.level_depths):
            prediction = head_preds.get(level, z_pred)
            level_losses.append(loss_fn(pool_target_blocks(prediction, (th, tw), level),
                                        pool_target_blocks(z_tgt[depth], (th, tw), level)))
        level_losses = torch.stack(level_losses)  # (L,)
        loss = (level_losses * self.level_weight_tensor).sum()

        final_depth = self.target_encoder.depth
        return dict(loss=loss, level_losses=level_losses.detach(),
                    target_std=std_across_batch(z_tgt[final_depth], batch_size),
                    pred_std=std_across_batch(z_pred, batch_size))

    @torch.no_grad()
    def update_target(self, momentum):
        """EMA step p_t <- m*p_t + (1-m)*p_c. Deterministic from the parameters, so DDP ranks that
        hold identical context parameters after the all-reduced step stay identical."""
        target_params = list(self.target_encoder.parameters())
        context_params = [p.detach() for p in self.context_encoder.parameters()]
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, context_params, alpha=1.0 - momentum)

    def trainable_modules(self):
        """{name: module} of the parts the optimiser trains (and DDP should wrap); never the target."""
        modules = {"context_encoder": self.context_encoder, "predictor": self.predictor}
        if self.level_heads is not None:
            modules["level_heads"] = self.level_heads
        return modules

    def param_groups(self, weight_decay):
        """AdamW groups: decay iff p.ndim >= 2 (weight matrices and kernels); none on biases, norms and
        the predictor's mask token (an embedding, exempt like timm's cls/pos tokens though it is 3-D)."""
        decay, no_decay = [], []
        for module in self.trainable_modules().values():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    (decay if p.ndim >= 2 and not name.endswith("mask_token") else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "apply_weight_decay": True},
                {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False}]


def _level_depths(level_depths, num_levels, encoder_depth):
    if not level_depths:
        return [encoder_depth] * num_levels
    if len(level_depths) != num_levels:
        raise UserError(f"model.level_depths has {len(level_depths)} entries but model.num_levels is {num_levels}")
    depths = []
    for d in level_depths:
        if float(d) != int(d) or not 1 <= int(d) <= encoder_depth:
            raise UserError(f"model.level_depths entry {d} is not a block number between 1 and {encoder_depth}")
        depths.append(int(d))
    return depths


def build_model(*, arch, patch_size, image_size, predictor_embed_dim=384, predictor_depth=6,
                predictor_num_heads=6, num_levels=3, level_weights=(1.0, 0.5, 0.25), level_depths=(),
                loss="smooth_l1", drop_path=0.0):
    """Build H-JEPA from plain keyword arguments; `model.model_config` records them for checkpoints."""
    if num_levels < 1:
        raise UserError(f"model.num_levels must be at least 1, got {num_levels}")
    level_weights = [float(w) for w in level_weights]
    if len(level_weights) != num_levels:
        raise UserError(f"model.level_weights has {len(level_weights)} entries but model.num_levels is {num_levels}")
    if loss not in LOSSES:
        raise UserError(f"model.loss {loss!r} is not one of {', '.join(LOSSES)}")
    context_encoder = build_encoder(arch, patch_size=patch_size, image_size=image_size, drop_path=drop_path)
    depths = _level_depths(list(level_depths), num_levels, context_encoder.depth)
    predictor = Predictor(grid_size=context_encoder.grid_size, embed_dim=context_encoder.embed_dim,
                          predictor_embed_dim=predictor_embed_dim, depth=predictor_depth,
                          num_heads=predictor_num_heads)
    head_levels = [level for level, d in enumerate(depths) if d != context_encoder.depth]
    level_heads = LevelHeads(head_levels, predictor_embed_dim, context_encoder.embed_dim) if head_levels else None
    model = HJEPA(context_encoder, predictor, level_weights=level_weights, level_depths=depths, loss=loss,
                  level_heads=level_heads)
    model.model_config = dict(arch=arch, patch_size=int(patch_size), image_size=int(image_size),
                              predictor_embed_dim=int(predictor_embed_dim), predictor_depth=int(predictor_depth),
                              predictor_num_heads=int(predictor_num_heads), num_levels=int(num_levels),
                              level_weights=level_weights, level_depths=[int(d) for d in level_depths],
                              loss=loss, drop_path=float(drop_path))
    return model
