"""H-JEPA: I-JEPA's context encoder / EMA target encoder / predictor, with a hierarchy of coarser targets.

Level 0 is I-JEPA's objective: regress the layer-normed final target-encoder features at the
target patches. Level h >= 1 averages prediction and target over 2^h x 2^h windows of each target
block on the 2-D patch grid (windows anchored at the block's top-left corner), so it asks for the
gist of a region. Optionally, level h takes its target from an intermediate target-encoder block
(`level_depths`) and then reads its prediction through its own linear head on the predictor's
hidden states; `level_heads` gives every level h >= 1 such a head at the final depth too (the coarse
levels then ask the predictor for a separate read-out rather than constraining the one per-patch
prediction's window means).

`level_windows` says where a level's windows lie. "block" (above): inside each target block, so a
level-h target is the mean of the block's own patches, which level 0 already predicts one by one.
With one shared read-out and final-depth targets, such a level adds no new target: a patch's squared
error is its cell's mean error plus its deviation from that mean, so the level-0 loss is the level-h
loss plus the error's within-cell spread (exactly so for unnormalised MSE), and the per-patch
prediction that minimises one minimises the other. The coarse level only re-weights the cell-mean
part of the error; a different target needs `level_depths`, `level_heads` or grid windows.
"grid": 2^h x 2^h windows of the whole patch grid, and a cell's target is the mean over every patch
of the window the block reaches into, masked or visible; each block token's head read-out is
averaged per window, so the coarse levels ask for the gist of a region larger than the block (the
top level of a deep enough hierarchy, a window as large as the grid, is the image's mean feature, the
average-pooled representation a linear probe reads). Needs `level_heads`: one read-out cannot be both
a patch and the mean of its window.

`target_blocks` K > 1 replaces the final-depth target by data2vec's: the mean of the last K target-encoder
blocks' layer-normed outputs, layer-normed again (the levels pool it as they pool I-JEPA's).

`var_weight` / `cov_weight` add VICReg's variance and covariance terms (`variance_covariance`) on each
image's mean context embedding: an option for recipes, off by default (I-JEPA has neither).

Two choices make the levels' losses mean what their weights say (bench/hierarchy_levels.py):
- Cells are weighted by their patch count. Blocks are rarely a multiple of the window, so edge
  cells are partial: over I-JEPA's 14 x 14 masks, 25% of blocks tile whole 2 x 2 windows and none
  4 x 4 windows. With a plain mean over cells, partial cells, holding 18.5% / 52% of the patches,
  carried 30% / 75% of the level-1 / level-2 loss, and one patch's gradient weight was up to 4x / 16x
  another's (a 5 x 5 block's 1-patch corner cell: a quarter of its level-2 loss). Weighted by count,
  every real patch weighs the same at every level, and the target distribution stays I-JEPA's
  (tiling blocks into whole windows would change it: no default block is a multiple of 4).
- Each pooled level-h >= 1 cell is layer-normed (`normalize_levels`): averaging layer-normed tokens
  shrinks them, the more the more they differ. The prediction is shifted and scaled by the same
  (target) mean and std (the mean over D of an average of layer-normed tokens is 0, so in effect a
  rescale by the pooled target's std), so the optimum is unchanged: a prediction equal to the target at every
  patch still scores zero at every level, and one shared prediction serves all levels. Measured
  shrink is modest so far: pooled-target std 1 / 0.96 / 0.91 at levels 0 / 1 / 2 for a random-init
  ViT-S/16, 1 / 0.95 / 0.88 for a vit_micro after 110 steps on Fashion-MNIST; normalised, the
  level losses rose 7-15% over unnormalised, to the level-0 scale.
"""
import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hjepa.errors import UserError
from hjepa.predictor import Predictor
from hjepa.vit import INIT_STD, build_encoder, gather_tokens, trunc_normal_

LOSSES = {"smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}  # both called with reduction="none"
LEVEL_WINDOWS = ("block", "grid")
LEVEL_NORM_EPS = 1e-5  # F.layer_norm's default, as on the level-0 targets


def gather_target_blocks(features, tgt_idx):
    """features (B, N, D), tgt_idx (T, B, Nt) -> (T*B, Nt, D), target-major like the predictor."""
    num_targets, batch_size, num_target_tokens = tgt_idx.shape
    idx = tgt_idx.permute(1, 0, 2).reshape(batch_size, num_targets * num_target_tokens)
    blocks = gather_tokens(features, idx).reshape(batch_size, num_targets, num_target_tokens, -1)
    return blocks.transpose(0, 1).reshape(num_targets * batch_size, num_target_tokens, -1)


def level_cells(tgt_pos, level, grid_size):
    """(..., C, Nt) float 0/1: which target tokens fall into each 2^level x 2^level cell.

    tgt_pos (..., Nt, 2) holds each token's (row, col), (-1, -1) for padding (in no cell): inside its
    block for block windows, on the patch grid for grid windows. Cells are numbered on a grid as
    large as the patch grid, so C depends only on (level, grid_size), never on the batch's block
    size: cells the tokens do not reach stay empty. Row sums are the cells' patch counts; at level 0
    each real token is its own cell.
    """
    window = 2 ** level
    cells_per_row = -(-grid_size[1] // window)
    num_cells = -(-grid_size[0] // window) * cells_per_row
    rows, cols = tgt_pos.unbind(-1)  # (..., Nt) each
    cell = torch.where(rows >= 0, (rows // window) * cells_per_row + cols // window, -1)  # (..., Nt)
    return (cell.unsqueeze(-2) == torch.arange(num_cells, device=cell.device).unsqueeze(-1)).float()  # (..., C, Nt)


def grid_cells(level, grid_size, device=None):
    """(C, N) float 0/1: which of the grid's N patches (row-major) lie in each 2^level x 2^level window
    of the patch grid; windows at the right and bottom edges may be partial."""
    patches = torch.arange(grid_size[0] * grid_size[1], device=device)
    return level_cells(torch.stack([patches // grid_size[1], patches % grid_size[1]], dim=-1), level, grid_size)


def block_grid_cells(tgt_idx, tgt_valid, level, grid_size):
    """(T*B, C, Nt) float 0/1: which grid window (grid_cells numbering) each real target token lies in.

    tgt_idx (T, B, Nt) patch indices on the grid, target-major like the predictor's output; tgt_valid
    (Nt,) False for padding (in no window). Row sums are the block's patches per window.
    """
    idx = tgt_idx.reshape(-1, tgt_idx.shape[-1])  # (T*B, Nt)
    positions = torch.stack([idx // grid_size[1], idx % grid_size[1]], dim=-1)  # (T*B, Nt, 2) on the grid
    return level_cells(torch.where(tgt_valid.unsqueeze(-1), positions, -1), level, grid_size)


def pool_target_blocks(z, cells):
    """Mean of (T*B, Nt, D) block tokens over each cell of cells (C, Nt) -> (T*B, C, D); empty cells 0.

    A matmul with the membership matrix, not avg_pool2d on a (th, tw) grid: the shapes stay those of
    the padded blocks whatever this batch's block size, and padding tokens are never averaged in.
    In float32 even under bf16 autocast (which would round the fp32 targets to 8 mantissa bits); the
    matmul is tiny next to the predictor's.
    """
    counts = cells.sum(dim=-1).clamp(min=1)  # (C,), or (T*B, C) for per-block cells (block_grid_cells)
    with torch.autocast(z.device.type, enabled=False):
        if cells.dim() == 3:
            return torch.einsum("kcn,knd->kcd", cells, z.float()) / counts.unsqueeze(-1)
        return torch.einsum("cn,bnd->bcd", cells, z.float()) / counts.unsqueeze(-1)


def level_loss(prediction, target, cell_weights, loss_fn, normalize):
    """Patch-count-weighted mean over cells of the per-cell loss (mean over D).

    prediction, target (T*B, C, D); cell_weights (C,) or (T*B, C) patches per cell (0 for empty
    cells and padding). With normalize, both are shifted and divided by the target cell's mean and std over D
    (the target becomes its layer_norm). With one weight per real token this is F.<loss>(prediction,
    target) over the real tokens, I-JEPA's loss.
    """
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)  # (T*B, C, 1)
        std = (target.var(dim=-1, correction=0, keepdim=True) + LEVEL_NORM_EPS).sqrt()
        prediction, target = (prediction - mean) / std, (target - mean) / std
    per_cell = loss_fn(prediction, target, reduction="none").mean(dim=-1)  # (T*B, C)
    cell_weights = cell_weights.expand_as(per_cell)
    return (per_cell * cell_weights).sum() / cell_weights.sum()


def variance_covariance(x, eps=1e-4):
    """VICReg's two regularisers of a batch of embeddings x (B, D): the mean over dims of
    relu(1 - std), std over the batch (a dim that stops varying across images is pushed back), and the
    sum of squared off-diagonal covariances over D (dims that carry the same information are pushed
    apart). In float32."""
    x = x.float()
    x = x - x.mean(dim=0)
    std = (x.var(dim=0) + eps).sqrt()  # (D,)
    cov = x.T @ x / (x.shape[0] - 1)  # (D, D)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return torch.relu(1.0 - std).mean(), off_diagonal.pow(2).sum() / x.shape[1]


def std_across_batch(z, batch_size, token_weights):
    """Collapse monitor: std over images of (T*B, Nt, D) features, averaged over targets, dims and the
    tokens with weight 1 in token_weights (Nt,) (padding has weight 0)."""
    z = z.detach().float()
    std = z.reshape(-1, batch_size, *z.shape[1:]).std(dim=1, correction=0).mean(dim=-1)  # (T, Nt)
    return (std * token_weights).sum() / (token_weights.sum() * std.shape[0])


class LevelHeads(nn.Module):
    """One linear read-out, on the predictor's hidden states, per level that has its own head: levels
    whose target comes from an intermediate target-encoder block, and with `level_heads` every level
    h >= 1."""

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
    def __init__(self, context_encoder, predictor, *, level_weights, level_depths, loss, level_heads=None,
                 normalize_levels=True, level_windows="block", var_weight=0.0, cov_weight=0.0, target_blocks=1):
        super().__init__()
        self.context_encoder = context_encoder
        self.target_encoder = copy.deepcopy(context_encoder)
        self.target_encoder.requires_grad_(False)
        for block in self.target_encoder.blocks:
            block.drop_path = 0.0  # targets are never stochastic, even while the model is in train mode
        self.predictor = predictor
        self.level_heads = level_heads
        # Relative weights, normalised to sum to 1: the prediction loss keeps I-JEPA's scale whatever the
        # number of levels, so the weights of the terms added to it (var_weight, cov_weight) mean the
        # same for every hierarchy. As a plain sum, 1.0/0.5 made the two-level prediction loss 1.5x the
        # one-level one and the terms two thirds as strong (docs/results.md measures the difference: "How
        # the variance/covariance terms and the coarse weight were chosen").
        self.level_weights = [w / sum(level_weights) for w in level_weights]
        # A buffer so the weighted mean needs no host-to-device copy each step; not part of any checkpoint.
        self.register_buffer("level_weight_tensor", torch.tensor(self.level_weights), persistent=False)
        self.level_depths = list(level_depths)  # 1-based target-encoder block per level
        self.target_blocks = target_blocks  # final-depth targets average this many last blocks (data2vec)
        self.loss_name = loss
        self.normalize_levels = normalize_levels
        self.level_windows = level_windows
        self.var_weight, self.cov_weight = var_weight, cov_weight
        self.config, self.model_config = None, {}  # filled by build_model

    @property
    def grid_size(self):
        """(rows, cols) of the patch grid, as hjepa.masks.sample_masks takes it."""
        return (self.context_encoder.grid_size, self.context_encoder.grid_size)

    @property
    def num_levels(self):
        return len(self.level_weights)

    @torch.no_grad()
    def target_features(self, images, tgt_idx):
        """{depth: layer-normed target-encoder features at the target blocks (T*B, Nt, D)}."""
        return {d: gather_target_blocks(h, tgt_idx) for d, h in self.target_grid_features(images).items()}

    @torch.no_grad()
    def target_grid_features(self, images):
        """{depth: layer-normed target-encoder features of every patch (B, N, D)}.

        The final depth is the encoder output after its own norm, then layer_norm without affine over
        D, exactly I-JEPA's `F.layer_norm(target_encoder(imgs), (D,))`; intermediate depths layer-norm
        the residual stream after that block. With `target_blocks` K > 1 the final depth's target is
        data2vec's instead: the mean of the last K blocks' layer-normed outputs (the final one as
        above), layer-normed again so that it keeps a unit scale per token.
        """
        encoder = self.target_encoder
        if self.target_blocks == 1 and all(d == encoder.depth for d in self.level_depths):
            final = encoder.forward_features(images)  # (B, N, D)
            return {encoder.depth: F.layer_norm(final, final.shape[-1:])}
        blocks = encoder.forward_blocks(images)  # depth x (B, N, D)
        averaged = range(encoder.depth - self.target_blocks + 1, encoder.depth + 1)
        needed = set(self.level_depths) | set(averaged)
        normed = {d: F.layer_norm(h, h.shape[-1:]) for d, h in
                  enumerate((*blocks[:-1], encoder.norm(blocks[-1])), start=1) if d in needed}
        if self.target_blocks > 1:
            mean = torch.stack([normed[d] for d in averaged]).mean(dim=0)
            normed[encoder.depth] = F.layer_norm(mean, mean.shape[-1:])
        # the final depth is always returned: the collapse monitor reads it
        return {d: normed[d] for d in (*self.level_depths, encoder.depth)}

    def forward(self, images, ctx_idx, tgt_idx, tgt_pos):
        """images (B, 3, H, W) normalised; ctx_idx (B, Nc); tgt_idx (T, B, Nt); tgt_pos (Nt, 2) the
        (row, col) of each target token in its block, (-1, -1) for padding (hjepa.masks.Masks).
        Returns dict(loss=scalar, level_losses=(L,) detached, target_std, pred_std).

        No Python number is read from a tensor here: the shapes are the masks' fixed sizes, so a
        torch.compile'd forward is traced once per masking configuration.
        """
        num_targets, batch_size, num_target_tokens = tgt_idx.shape
        if tgt_pos.shape != (num_target_tokens, 2):
            raise ValueError(f"tgt_pos has shape {tuple(tgt_pos.shape)}, expected ({num_target_tokens}, 2)")
        tgt_valid = tgt_pos[:, 0] >= 0  # (Nt,) False for padding

        # 1. targets (no grad): layer-normed target-encoder features at every target block
        z_grid = self.target_grid_features(images)  # {depth: (B, N, D)}
        z_tgt = {d: gather_target_blocks(h, tgt_idx) for d, h in z_grid.items()}  # {depth: (T*B, Nt, D)}

        # 2. predict: encode the context tokens only, then every target block in one predictor call
        z_ctx = self.context_encoder(images, ctx_idx)  # (B, Nc, D)
        if self.level_heads is None:
            z_pred = self.predictor(z_ctx, ctx_idx, tgt_idx, tgt_valid)  # (T*B, Nt, D)
            head_preds = {}
        else:
            z_pred, hidden = self.predictor(z_ctx, ctx_idx, tgt_idx, tgt_valid, return_hidden=True)
            head_preds = dict(zip(self.level_heads.levels, self.level_heads(hidden)))

        # 3. loss per level on the 2-D-pooled blocks, cells weighted by patch count; weighted mean
        loss_fn = LOSSES[self.loss_name]
        token_weights = tgt_valid.float()  # (Nt,)
        level_losses = []
        for level, depth in enumerate(self.level_depths):
            prediction, target = head_preds.get(level, z_pred), z_tgt[depth]
            if level == 0:  # every real token its own cell: I-JEPA's loss exactly
                level_losses.append(level_loss(prediction, target, token_weights, loss_fn, normalize=False))
                continue
            if self.level_windows == "grid":  # the block's tokens per window vs the whole window's mean
                cells = block_grid_cells(tgt_idx, tgt_valid, level, self.grid_size)  # (T*B, C, Nt)
                windows = grid_cells(level, self.grid_size, tgt_idx.device)  # (C, N)
                target = pool_target_blocks(z_grid[depth], windows)  # (B, C, D)
                target = target.unsqueeze(0).expand(num_targets, *target.shape).flatten(0, 1)  # (T*B, C, D)
                level_losses.append(level_loss(pool_target_blocks(prediction, cells), target, cells.sum(dim=-1),
                                               loss_fn, normalize=self.normalize_levels))
                continue
            cells = level_cells(tgt_pos, level, self.grid_size)  # (C, Nt)
            level_losses.append(level_loss(pool_target_blocks(prediction, cells), pool_target_blocks(target, cells),
                                           cells.sum(dim=1), loss_fn, normalize=self.normalize_levels))
        level_losses = torch.stack(level_losses)  # (L,)
        loss = (level_losses * self.level_weight_tensor).sum()
        if self.var_weight or self.cov_weight:  # on the mean context embedding of each image (this rank's batch)
            variance, covariance = variance_covariance(z_ctx.mean(dim=1))
            loss = loss + self.var_weight * variance + self.cov_weight * covariance

        final_depth = self.target_encoder.depth
        return dict(loss=loss, level_losses=level_losses.detach(),
                    target_std=std_across_batch(z_tgt[final_depth], batch_size, token_weights),
                    pred_std=std_across_batch(z_pred, batch_size, token_weights))

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
        """AdamW groups of the trainable parts (weight_decay_groups)."""
        return weight_decay_groups([item for module in self.trainable_modules().values()
                                    for item in module.named_parameters()], weight_decay)


def weight_decay_groups(named_parameters, weight_decay):
    """AdamW groups of (name, parameter) pairs: decay iff p.ndim >= 2 (weight matrices and kernels); none on
    biases, norms and the predictor's mask token (an embedding, exempt like timm's cls/pos tokens though it
    is 3-D). Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith("mask_token") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "apply_weight_decay": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False}]


def _level_depths(level_depths, num_levels, encoder_depth):
    if not level_depths:
        return [encoder_depth] * num_levels
    for d in level_depths:
        if not 1 <= d <= encoder_depth:
            raise UserError(f"model.level_depths entry {d} is not a block number between 1 and {encoder_depth}")
    return list(level_depths)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines an H-JEPA architecture (the model section, plus data.image_size).
    Checkpoints record it as `as_record()`; `from_record` reads it back."""
    arch: str = "vit_small"           # encoder size: vit_micro | vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 16              # pixels
    image_size: int = 224             # pixels
    predictor_embed_dim: int = 384
    predictor_depth: int = 6
    predictor_num_heads: int = 6
    num_levels: int = 3               # level h pools 2^h x 2^h patches
    level_weights: tuple = (1.0, 0.5, 0.25)
    level_depths: tuple = ()          # target-encoder block per level (1-based); () = the final block
    loss: str = "smooth_l1"
    drop_path: float = 0.0            # stochastic depth of the context encoder
    normalize_levels: bool = True     # layer-norm each pooled level >= 1 target
    level_heads: bool = False         # levels >= 1 predict through their own linear heads
    level_windows: str = "block"      # "block": windows inside each target block; "grid": on the patch grid
    var_weight: float = 0.0           # VICReg variance term on the mean context embedding per image
    cov_weight: float = 0.0           # VICReg covariance term, likewise
    target_blocks: int = 1            # final-depth target: mean of the last K blocks' outputs (data2vec); 1 = I-JEPA

    def __post_init__(self):
        # Lists from YAML, JSON or a checkpoint become tuples: the config stays hashable and comparable.
        object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))
        if any(float(d) != int(d) for d in self.level_depths):
            raise UserError(f"model.level_depths {list(self.level_depths)} must be block numbers (integers)")
        object.__setattr__(self, "level_depths", tuple(int(d) for d in self.level_depths))
        if self.num_levels < 1:
            raise UserError(f"model.num_levels must be at least 1, got {self.num_levels}")
        if len(self.level_weights) != self.num_levels:
            raise UserError(f"model.level_weights has {len(self.level_weights)} entries but model.num_levels "
                            f"is {self.num_levels}")
        if min(self.level_weights) < 0 or sum(self.level_weights) <= 0:
            raise UserError(f"model.level_weights {list(self.level_weights)} must be non-negative with a positive sum "
                            "(they are relative: normalised to sum to 1)")
        if self.level_depths and len(self.level_depths) != self.num_levels:
            raise UserError(f"model.level_depths has {len(self.level_depths)} entries but model.num_levels "
                            f"is {self.num_levels}")
        if self.level_heads and self.num_levels < 2:
            raise UserError("model.level_heads gives levels >= 1 their own heads; with model.num_levels=1 "
                            "there are none")
        if self.level_windows not in LEVEL_WINDOWS:
            raise UserError(f"model.level_windows {self.level_windows!r} is not one of {', '.join(LEVEL_WINDOWS)}")
        if self.level_windows == "grid" and not self.level_heads:
            raise UserError("model.level_windows=grid needs model.level_heads=1: one read-out per patch cannot "
                            "be both the patch's target and the mean of its window")
        if self.target_blocks < 1:
            raise UserError(f"model.target_blocks must be at least 1 (1 = the final block only), "
                            f"got {self.target_blocks}")
        if self.loss not in LOSSES:
            raise UserError(f"model.loss {self.loss!r} is not one of {', '.join(LOSSES)}")

    def as_record(self):
        """Plain types only (lists, not tuples), as checkpoints and JSON hold them."""
        record = dataclasses.asdict(self)
        record["level_weights"], record["level_depths"] = list(self.level_weights), list(self.level_depths)
        return record

    @classmethod
    def from_record(cls, record):
        unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"model config has unknown keys {', '.join(unknown)} (written by another version?)")
        return cls(**record)


def build_model(config):
    """H-JEPA of ModelConfig `config`; `model.config` keeps it and `model.model_config` its record."""
    context_encoder = build_encoder(config.arch, patch_size=config.patch_size, image_size=config.image_size,
                                    drop_path=config.drop_path)
    depths = _level_depths(list(config.level_depths), config.num_levels, context_encoder.depth)
    if config.target_blocks > context_encoder.depth:
        raise UserError(f"model.target_blocks={config.target_blocks} averages more blocks than {config.arch} has "
                        f"({context_encoder.depth})")
    predictor = Predictor(grid_size=context_encoder.grid_size, embed_dim=context_encoder.embed_dim,
                          predictor_embed_dim=config.predictor_embed_dim, depth=config.predictor_depth,
                          num_heads=config.predictor_num_heads)
    head_levels = [level for level, d in enumerate(depths)
                   if d != context_encoder.depth or (config.level_heads and level >= 1)]
    level_heads = (LevelHeads(head_levels, config.predictor_embed_dim, context_encoder.embed_dim)
                   if head_levels else None)
    model = HJEPA(context_encoder, predictor, level_weights=config.level_weights, level_depths=depths,
                  loss=config.loss, level_heads=level_heads, normalize_levels=config.normalize_levels,
                  level_windows=config.level_windows, var_weight=config.var_weight,
                  cov_weight=config.cov_weight, target_blocks=config.target_blocks)
    model.config = config
    model.model_config = config.as_record()
    return model
