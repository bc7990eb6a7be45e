"""Small H-JEPA models and hand-made masks for the model and objective tests."""
import pytest
import torch

SMALL_MODEL = dict(arch="vit_tiny", patch_size=8, image_size=32, predictor_embed_dim=64, predictor_depth=2,
                   predictor_num_heads=4)  # a 4 x 4 patch grid


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, and on a busy 2-core
    machine OpenMP's waiting made the 20-step overfit test >10x slower (5 s vs 66 s, measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def block_positions(th, tw, num_target_tokens=None):
    """(Nt, 2) (row, col) of a th x tw block's tokens, row-major, then (-1, -1) padding up to Nt."""
    num_target_tokens = num_target_tokens or th * tw
    pos = torch.full((num_target_tokens, 2), -1, dtype=torch.long)
    pos[:th * tw, 0] = torch.arange(th).repeat_interleave(tw)
    pos[:th * tw, 1] = torch.arange(tw).repeat(th)
    return pos


def make_batch(batch_size=2, num_ctx=8, num_targets=3, tgt_shape=(2, 2), grid=4, seed=0, num_target_tokens=None):
    """Images, a context and row-major th x tw target blocks on a grid x grid patch grid, padded (with
    the block's top-left patch, as hjepa.masks does) to num_target_tokens. Returns the forward's args."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, grid * 8, grid * 8, generator=g)
    ctx_idx = torch.stack([torch.randperm(grid * grid, generator=g)[:num_ctx] for _ in range(batch_size)])
    tgt_pos = block_positions(*tgt_shape, num_target_tokens)
    rows, cols = tgt_pos.clamp(min=0).unbind(-1)
    tgt_idx = torch.empty(num_targets, batch_size, tgt_pos.shape[0], dtype=torch.long)
    for t in range(num_targets):
        for b in range(batch_size):
            top = int(torch.randint(0, grid - tgt_shape[0] + 1, (1,), generator=g))
            left = int(torch.randint(0, grid - tgt_shape[1] + 1, (1,), generator=g))
            tgt_idx[t, b] = (top + rows) * grid + left + cols
    return images, ctx_idx, tgt_idx, tgt_pos
