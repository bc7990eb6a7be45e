"""Vision Transformer encoder for I-JEPA / H-JEPA, with timm's module names and no class token.

State-dict keys follow timm's `VisionTransformer` (`patch_embed.proj`, `pos_embed`,
`blocks.{i}.norm1`, `.attn.qkv`, `.attn.proj`, `.norm2`, `.mlp.fc1`, `.mlp.fc2`, `norm`), so an
encoder's weights load into a timm ViT built with `class_token=False, global_pool='avg'`.
Masked tokens are removed with a gather before the first block (I-JEPA's `apply_masks`), so the
encoder's cost scales with the number of kept tokens.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hjepa.errors import UserError

# (embed_dim, depth, num_heads), as in I-JEPA / timm / DeiT; vit_micro is ours, for CPU demos and tests
ARCHS = {
    "vit_micro": (96, 4, 3),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
INIT_STD = 0.02
LAYER_NORM_EPS = 1e-6


def sincos_pos_embed_2d(embed_dim, grid_size):
    """Fixed 2-D sin-cos position embedding of a square grid, (grid_size**2, embed_dim), row-major.

    Same values as I-JEPA's/MAE's `get_2d_sincos_pos_embed`: the first half of the channels encodes
    the column index, the second half the row index (their meshgrid puts w first), so weights ported
    from those codebases see the position code they were trained with.
    """
    if embed_dim % 4 != 0:
        raise UserError(f"embedding width {embed_dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def sincos_1d(positions, dim):  # (M,) -> (M, dim)
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        angles = positions.reshape(-1, 1) * omega  # (M, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([sincos_1d(cols, embed_dim // 2), sincos_1d(rows, embed_dim // 2)], dim=1)
    return emb.float()  # (N, D)


def gather_tokens(x, idx):
    """Keep the tokens `idx` (B, K) of x (B, N, D) -> (B, K, D): I-JEPA's apply_masks for one mask."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def drop_path(x, drop_prob, training):
    """Stochastic depth: zero a residual branch per sample with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * keep / keep_prob


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens: a stride-p Conv2d's weights (timm's and I-JEPA's
    `patch_embed.proj`, so their checkpoints load as they are), applied as one matmul over flattened
    patches. Same products and sums as the convolution; on a GPU, cuDNN ran this 3-channel convolution
    as a slow NHWC kernel behind a channel-padding pass (docs/results.md, the H200 device check)."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D), patches in row-major order
        B, C, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        patches = patches.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p), the weight's order
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads != 0:
            raise UserError(f"width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        """x (B, N, D); attn_mask: None or bool broadcastable to (B, heads, N, N), True = may attend."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, attn_mask=None):
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


def trunc_normal_(tensor, std):
    """timm's / I-JEPA's trunc_normal_(std=std), whose bounds are +-2 in absolute units: at std 0.02
    that is +-100 std, never reached, so a clamped normal draws the same distribution ~5x faster
    (torch's inverse-CDF trunc_normal_ takes seconds on a CPU for vit_large)."""
    with torch.no_grad():
        return tensor.normal_(0.0, std).clamp_(-2.0, 2.0)


def init_transformer_weights(module, blocks, init_std=INIT_STD):
    """I-JEPA's init: truncated-normal linears/convs, zero biases, unit LayerNorms, then divide each
    block's attn.proj and mlp.fc2 weights by sqrt(2 * layer_id) so the residual stream's variance
    does not grow with depth (I-JEPA `fix_init_weight`)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # A fixed buffer, not a Parameter: never trained, never in an optimizer, still in the state_dict.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0))
        drop_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in drop_rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_transformer_weights(self, self.blocks)

    def embed(self, x, keep_idx=None):
        """Patchify, add positions and drop every token not in keep_idx (B, K) -> (B, K or N, D)."""
        if x.shape[-2:] != (self.grid_size * self.patch_size,) * 2:
            raise ValueError(f"expected {self.grid_size * self.patch_size}px images, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        if keep_idx is not None:
            x = gather_tokens(x, keep_idx)  # (B, K, D): dropped tokens never reach a block
        return x

    def forward_features(self, x, keep_idx=None):
        """Images (B, 3, H, W) -> final normed tokens (B, K, D), K = keep_idx.shape[1] or all N."""
        x = self.embed(x, keep_idx)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_blocks(self, x, keep_idx=None):
        """Images -> list of `depth` tensors (B, K, D): the residual stream after each block, before
        the final norm (so entry i is block i+1's output; apply `self.norm` or a LayerNorm as needed)."""
        x = self.embed(x, keep_idx)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x, keep_idx=None):
        # forward == forward_features, so a DDP- or compile-wrapped encoder is called the same way.
        return self.forward_features(x, keep_idx)


def build_encoder(arch, *, patch_size, image_size, drop_path=0.0):
    """A ViT of size `arch` (vit_tiny/small/base/large) for square `image_size` px images."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if patch_size < 1 or image_size % patch_size != 0:
        raise UserError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    embed_dim, depth, num_heads = ARCHS[arch]
    return VisionTransformer(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, drop_path=drop_path)
