"""The I-JEPA predictor: a narrow transformer that fills in target blocks from context tokens.

Module names follow I-JEPA's `VisionTransformerPredictor` (predictor_embed, mask_token,
predictor_pos_embed, predictor_blocks, predictor_norm, predictor_proj), so its weights port over.
"""
import torch
import torch.nn as nn

from hjepa.errors import UserError
from hjepa.vit import (INIT_STD, LAYER_NORM_EPS, Block, gather_tokens, init_transformer_weights, sincos_pos_embed_2d,
                       trunc_normal_)


class Predictor(nn.Module):
    def __init__(self, *, grid_size, embed_dim, predictor_embed_dim, depth, num_heads, mlp_ratio=4.0):
        super().__init__()
        if predictor_embed_dim % num_heads != 0:
            raise UserError(f"predictor_embed_dim {predictor_embed_dim} is not divisible by "
                            f"predictor_num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.predictor_embed_dim = predictor_embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.register_buffer("predictor_pos_embed",
                             sincos_pos_embed_2d(predictor_embed_dim, grid_size).unsqueeze(0))
        self.predictor_blocks = nn.ModuleList(Block(predictor_embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        init_transformer_weights(self, self.predictor_blocks)
        trunc_normal_(self.mask_token, INIT_STD)

    def forward(self, z_ctx, ctx_idx, tgt_idx, tgt_valid=None, return_hidden=False):
        """Predict every target block from the context in one batched pass.

        z_ctx (B, Nc, D) context-encoder tokens at positions ctx_idx (B, Nc); tgt_idx (T, B, Nt);
        tgt_valid: None (every target token is real) or (Nt,) bool, False for padding tokens. Padding
        queries are hidden from every other token by the attention mask, so real tokens' predictions
        equal those of an unpadded block; padding predictions are computed and meant to be ignored.
        Returns predictions (T*B, Nt, D), target-major (row t*B + b is target t of image b, the
        order of I-JEPA's apply_masks), and with return_hidden also the normed predictor-width
        states (T*B, Nt, d) that the per-level heads read.
        """
        num_targets, batch_size, num_target_tokens = tgt_idx.shape
        num_ctx_tokens = z_ctx.shape[1]
        pos = self.predictor_pos_embed  # (1, N, d)

        x = self.predictor_embed(z_ctx)  # (B, Nc, d)
        x = x + gather_tokens(pos.expand(batch_size, -1, -1), ctx_idx)

        flat_tgt_idx = tgt_idx.reshape(num_targets * batch_size, num_target_tokens)
        queries = self.mask_token + gather_tokens(pos.expand(flat_tgt_idx.shape[0], -1, -1), flat_tgt_idx)  # (T*B, Nt, d)
        # Each target block sees the whole context and only its own queries, as in I-JEPA.
        x = torch.cat([x.repeat(num_targets, 1, 1), queries], dim=1)  # (T*B, Nc+Nt, d)

        attn_mask = None
        if tgt_valid is not None:  # keys: every context token, the real queries only
            keys = torch.cat([tgt_valid.new_ones(num_ctx_tokens), tgt_valid])  # (Nc+Nt,)
            attn_mask = keys.view(1, 1, 1, -1)  # broadcast over blocks, heads and queries
        for block in self.predictor_blocks:
            x = block(x, attn_mask)
        hidden = self.predictor_norm(x[:, num_ctx_tokens:])  # (T*B, Nt, d)
        z_pred = self.predictor_proj(hidden)  # (T*B, Nt, D)
        return (z_pred, hidden) if return_hidden else z_pred
