"""The ViT encoder, the predictor and the H-JEPA objective (hjepa.vit, hjepa.predictor, hjepa.model)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hjepa.checkpoint import architecture_differences
from hjepa.errors import UserError
from hjepa.model import (ModelConfig, block_grid_cells, build_model, gather_target_blocks, grid_cells, level_cells,
                         level_loss, pool_target_blocks, variance_covariance)
from hjepa.vit import ARCHS, Attention, VisionTransformer, build_encoder

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


# ---------------------------------------------------------------------------------------------
# Encoder


# vit_base/vit_large run on the meta device: shapes without data, since initialising 300M real
# parameters alone takes seconds on a 2-core CPU.
@pytest.mark.parametrize("arch,device", [("vit_tiny", "cpu"), ("vit_small", "cpu"), ("vit_base", "meta"),
                                         ("vit_large", "meta")])
def test_encoder_output_shapes_with_and_without_keep_idx(arch, device):
    embed_dim, depth, _ = ARCHS[arch]
    with torch.device(device), torch.no_grad():
        encoder = build_encoder(arch, patch_size=8, image_size=32)  # 16 patches
        images = torch.randn(2, 3, 32, 32)
        keep_idx = torch.tensor([[0, 5, 10, 15, 3], [1, 2, 3, 4, 5]])
        assert encoder.forward_features(images).shape == (2, 16, embed_dim)
        assert encoder.forward_features(images, keep_idx).shape == (2, 5, embed_dim)
        blocks = encoder.forward_blocks(images, keep_idx)
    assert len(blocks) == depth == encoder.depth
    assert all(b.shape == (2, 5, embed_dim) for b in blocks)


def test_dropped_tokens_never_reach_the_first_block():
    encoder = build_encoder("vit_tiny", patch_size=8, image_size=32)
    seen = []
    encoder.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    keep_idx = torch.tensor([[0, 7, 9], [2, 3, 15]])
    encoder.forward_features(torch.randn(2, 3, 32, 32), keep_idx)
    assert seen == [torch.Size([2, 3, 192])]


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embedding_equals_the_stride_p_convolution_of_its_weights(channels_last):
    encoder = build_encoder("vit_micro", patch_size=8, image_size=32)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    proj = encoder.patch_embed.proj
    expected = F.conv2d(images, proj.weight, proj.bias, stride=8).flatten(2).transpose(1, 2)  # (B, N, D)
    tokens = encoder.patch_embed(images)
    assert tokens.shape == (2, 16, 96)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_kept_tokens_equal_the_full_embedding_gathered_then_encoded():
    encoder = build_encoder("vit_tiny", patch_size=8, image_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    keep_idx = torch.tensor([[0, 7, 9], [2, 3, 15]])
    with torch.no_grad():
        tokens = encoder.patch_embed(images) + encoder.pos_embed  # (B, N, D)
        x = torch.stack([tokens[b, keep_idx[b]] for b in range(2)])
        for block in encoder.blocks:
            x = block(x)
        torch.testing.assert_close(encoder.forward_features(images, keep_idx), encoder.norm(x))


def test_last_block_output_normed_is_forward_features():
    encoder = build_encoder("vit_tiny", patch_size=8, image_size=32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.norm(encoder.forward_blocks(images)[-1]), encoder.forward_features(images))


def test_vit_small_encoder_has_21_7M_parameters_at_224_16():
    encoder = build_encoder("vit_small", patch_size=16, image_size=224)
    d, depth, n = 384, 12, 196
    per_block = 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 weights + biases, two LayerNorms
    expected_params = 3 * 16 * 16 * d + d + depth * per_block + 2 * d
    assert sum(p.numel() for p in encoder.parameters()) == expected_params
    with_pos = expected_params + n * d  # timm counts pos_embed as a parameter
    assert 21.6e6 < with_pos < 21.8e6
    assert not encoder.pos_embed.requires_grad


def test_state_dict_keys_and_shapes_match_timm_vision_transformer():
    # The keys of timm.create_model("vit_*", class_token=False, global_pool="avg", fc_norm=False,
    # num_classes=0): written out by hand because timm is not a dependency.
    encoder = VisionTransformer(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    expected = {"pos_embed": (1, 16, 64), "patch_embed.proj.weight": (64, 3, 8, 8), "patch_embed.proj.bias": (64,),
                "norm.weight": (64,), "norm.bias": (64,)}
    for i in range(2):
        for name, shape in [("norm1", (64,)), ("norm2", (64,))]:
            expected[f"blocks.{i}.{name}.weight"] = shape
            expected[f"blocks.{i}.{name}.bias"] = shape
        for name, (out_f, in_f) in [("attn.qkv", (192, 64)), ("attn.proj", (64, 64)),
                                    ("mlp.fc1", (256, 64)), ("mlp.fc2", (64, 256))]:
            expected[f"blocks.{i}.{name}.weight"] = (out_f, in_f)
            expected[f"blocks.{i}.{name}.bias"] = (out_f,)
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == expected


def test_image_size_not_divisible_by_patch_size_is_a_user_error():
    with pytest.raises(UserError, match=r"image_size 100 .* patch_size 16"):
        build_encoder("vit_small", patch_size=16, image_size=100)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="vit_huge"):
        build_encoder("vit_huge", patch_size=16, image_size=224)


def test_sdpa_attention_equals_naive_softmax_attention():
    torch.manual_seed(0)
    attention = Attention(dim=48, num_heads=3)
    x = torch.randn(2, 7, 48)
    q, k, v = attention.qkv(x).reshape(2, 7, 3, 3, 16).permute(2, 0, 3, 1, 4)  # each (B, heads, N, 16)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(dim=-1)
    naive = attention.proj((weights @ v).transpose(1, 2).reshape(2, 7, 48))
    torch.testing.assert_close(attention(x), naive, atol=1e-5, rtol=1e-5)


def test_residual_projections_are_rescaled_by_depth_at_init():
    torch.manual_seed(0)
    encoder = build_encoder("vit_small", patch_size=8, image_size=32)
    first, last = encoder.blocks[0].mlp.fc2.weight.std().item(), encoder.blocks[11].mlp.fc2.weight.std().item()
    assert first == pytest.approx(0.02 / math.sqrt(2), rel=0.05)
    assert last == pytest.approx(0.02 / math.sqrt(24), rel=0.05)
    assert encoder.blocks[11].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Predictor and targets


def test_predictor_returns_one_prediction_per_target_token_at_encoder_width():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0]))
    images, ctx_idx, tgt_idx, _ = make_batch(num_targets=3, tgt_shape=(2, 3))
    z_ctx = model.context_encoder(images, ctx_idx)
    z_pred, hidden = model.predictor(z_ctx, ctx_idx, tgt_idx, return_hidden=True)
    assert z_pred.shape == (3 * 2, 6, 192)
    assert hidden.shape == (3 * 2, 6, 64)


def test_target_blocks_are_gathered_target_major():
    features = torch.arange(2 * 16).float().reshape(2, 16, 1)  # value = b * 16 + patch
    tgt_idx = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])  # (T=2, B=2, Nt=2)
    blocks = gather_target_blocks(features, tgt_idx)  # (T*B, Nt, 1)
    assert blocks[..., 0].tolist() == [[0, 1], [18, 19], [4, 5], [22, 23]]


# ---------------------------------------------------------------------------------------------
# The hierarchy: 2-D pooling of target blocks


def pooled(values, tgt_shape, level, num_target_tokens=None, grid=(8, 8)):
    """Cell means of one row-major block whose token features are `values` (padding after them)."""
    pos = block_positions(*tgt_shape, num_target_tokens)
    z = torch.zeros(1, pos.shape[0], 1)
    z[0, :len(values), 0] = torch.tensor(values, dtype=torch.float)
    cells = level_cells(pos, level, grid)
    return pool_target_blocks(z, cells)[0, :, 0], cells.sum(dim=1)


def test_level_pooling_averages_2x2_windows_on_the_patch_grid_with_partial_edges():
    # One 3 x 5 target block (row-major tokens 0..14), each token's feature = its index, on an 8 x 8 grid:
    # level 1 has 4 x 4 cells, the block fills 2 x 3 of them.
    means, counts = pooled(list(range(15)), (3, 5), level=1)
    expected = [(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2, 0,  # right column: real patches only
                (10 + 11) / 2, (12 + 13) / 2, 14.0, 0] + [0] * 8  # bottom row: real patches only
    assert means.tolist() == pytest.approx(expected)
    assert counts.tolist() == [4, 4, 2, 0, 2, 2, 1, 0] + [0] * 8
    # Pooling over token order would mix row ends with the next row's start (4 with 5, 6, 7).
    assert [t.mean().item() for t in torch.arange(15.0).split(4)][:3] != pytest.approx(expected[:3])


def test_level_pooling_window_larger_than_the_block_averages_real_patches():
    means, counts = pooled(list(range(15)), (3, 5), level=2)  # 4 x 4 windows, 2 x 2 cells
    left = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [10, 11, 12, 13]]).float().mean().item()
    assert means.tolist() == pytest.approx([left, (4 + 9 + 14) / 3, 0, 0])
    assert counts.tolist() == [12, 3, 0, 0]


def test_padding_tokens_fall_in_no_cell_at_any_level():
    values = list(range(6))  # a 2 x 3 block padded to 10 tokens; padding features would be 100
    pos = block_positions(2, 3, 10)
    z = torch.cat([torch.arange(6.0), torch.full((4,), 100.0)]).reshape(1, 10, 1)
    for level in range(3):
        cells = level_cells(pos, level, (8, 8))
        assert cells[:, 6:].sum() == 0 and cells.sum() == 6
        unpadded = pooled(values, (2, 3), level)[0]
        assert pool_target_blocks(z, cells)[0, :, 0].tolist() == pytest.approx(unpadded.tolist())


def test_level_loss_weights_cells_by_patch_count():
    # Cells with 4, 2 and 1 patches and per-cell MSE 1, 2, 3 (one dim): (4*1 + 2*2 + 1*3) / 7 = 11 / 7,
    # where a plain mean over cells would give 2 and let the 1-patch cell carry a third of the loss.
    prediction = torch.tensor([1.0, 2.0 ** 0.5, 3.0 ** 0.5]).reshape(1, 3, 1)
    target = torch.zeros(1, 3, 1)
    weights = torch.tensor([4.0, 2.0, 1.0])
    loss = level_loss(prediction, target, weights, F.mse_loss, normalize=False)
    assert loss.item() == pytest.approx(11 / 7)


def test_patch_count_weighting_gives_every_real_patch_the_same_gradient():
    # A 5 x 5 block at level 2 (cells of 16, 4, 4, 1 patches): with MSE and the same error at every
    # patch, each patch's prediction gets the same gradient, also in the 1-patch corner cell.
    pos = block_positions(5, 5)
    cells = level_cells(pos, 2, (8, 8))
    prediction = torch.ones(1, 25, 1, requires_grad=True)
    loss = level_loss(pool_target_blocks(prediction, cells), torch.zeros(1, cells.shape[0], 1), cells.sum(dim=1),
                      F.mse_loss, normalize=False)
    loss.backward()
    assert sorted(cells.sum(dim=1).tolist(), reverse=True)[:4] == [16, 4, 4, 1]
    torch.testing.assert_close(prediction.grad, torch.full_like(prediction, 2 / 25))


def test_level_normalisation_layer_norms_the_pooled_target_and_scales_the_prediction_alike():
    torch.manual_seed(0)
    target = 0.3 * torch.randn(2, 3, 16) + 0.1  # shrunken cells, as averaging layer-normed tokens gives
    prediction = target + 0.05 * torch.randn(2, 3, 16)
    weights = torch.ones(3)
    normed = level_loss(prediction, target, weights, F.mse_loss, normalize=True)
    std = (target.var(dim=-1, correction=0, keepdim=True) + 1e-5).sqrt()
    expected = F.mse_loss((prediction - target) / std, torch.zeros_like(target))
    torch.testing.assert_close(normed, expected)
    torch.testing.assert_close(normed, F.mse_loss((prediction - target.mean(-1, keepdim=True)) / std,
                                                  F.layer_norm(target, (16,))), rtol=1e-5, atol=1e-7)
    assert level_loss(target, target, weights, F.mse_loss, normalize=True).item() == 0.0  # optimum unchanged


# ---------------------------------------------------------------------------------------------
# The objective


def ijepa_reference_loss(model, images, ctx_idx, tgt_idx, loss_fn):
    """I-JEPA's train step (src/train.py), written out: layer_norm the target features, apply_masks per
    target block (cat over blocks), predictor on the masked context, then the loss with its defaults."""
    def apply_masks(x, masks):
        return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], dim=0)

    with torch.no_grad():
        h = model.target_encoder(images)
        h = F.layer_norm(h, (h.size(-1),))
        h = apply_masks(h, list(tgt_idx))
    z = model.context_encoder(images, ctx_idx)
    z = model.predictor(z, ctx_idx, tgt_idx)
    return loss_fn(z, h)


@pytest.mark.parametrize("loss,loss_fn", [("smooth_l1", F.smooth_l1_loss), ("mse", F.mse_loss)])
def test_one_level_loss_equals_ijepa_reference(loss, loss_fn):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0], loss=loss))
    model.update_target(0.5)  # make the target differ from the context encoder (both start equal)
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # Blocks padded from 6 to 9 tokens, as the masks pad them: the reference sees the 6 real ones only.
    images, ctx_idx, tgt_idx, tgt_pos = make_batch(num_targets=4, tgt_shape=(2, 3), num_target_tokens=9)
    out = model(images, ctx_idx, tgt_idx, tgt_pos)
    reference = ijepa_reference_loss(model, images, ctx_idx, tgt_idx[..., :6], loss_fn)
    torch.testing.assert_close(out["loss"], reference, rtol=1e-6, atol=0)
    assert out["level_losses"].shape == (1,)


def test_padding_changes_no_level_loss_and_gets_no_gradient():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=3, level_weights=[1.0, 0.5, 0.25]))
    images, ctx_idx, tgt_idx, tgt_pos = make_batch(tgt_shape=(3, 2), num_target_tokens=8)
    unpadded = model(images, ctx_idx, tgt_idx[..., :6], tgt_pos[:6])
    queries = []
    model.predictor.predictor_norm.register_forward_hook(lambda module, inputs, output: queries.append(inputs[0]))
    padded = model(images, ctx_idx, tgt_idx, tgt_pos)
    queries[-1].retain_grad()
    padded["loss"].backward()
    torch.testing.assert_close(padded["level_losses"], unpadded["level_losses"], rtol=1e-5, atol=1e-7)
    assert queries[-1].grad[:, 6:].abs().max() == 0  # padding predictions reach no loss
    assert queries[-1].grad[:, :6].abs().max() > 0


def test_loss_is_the_weighted_sum_of_level_losses():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=3, level_weights=[1.0, 0.5, 0.25]))
    out = model(*make_batch(tgt_shape=(3, 3)))
    assert out["level_losses"].shape == (3,)
    expected = out["level_losses"] @ torch.tensor([1.0, 0.5, 0.25])
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_level_depths_take_targets_from_intermediate_blocks_through_heads():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=[1.0, 0.5], level_depths=[4, 12]))
    assert model.level_heads.levels == [0]
    images, ctx_idx, tgt_idx, tgt_pos = make_batch(tgt_shape=(2, 2))
    targets = model.target_features(images, tgt_idx)
    block4 = model.target_encoder.forward_blocks(images)[3]
    torch.testing.assert_close(targets[4], gather_target_blocks(F.layer_norm(block4, (192,)), tgt_idx))
    out = model(images, ctx_idx, tgt_idx, tgt_pos)
    out["loss"].backward()
    assert model.level_heads.heads[0].weight.grad.abs().sum() > 0


def test_level_heads_give_each_coarse_level_its_own_read_out_at_the_final_depth():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=3, level_weights=[1.0, 0.5, 0.25], level_heads=True))
    assert model.level_heads.levels == [1, 2]  # level 0 stays the predictor's own projection (I-JEPA)
    images, ctx_idx, tgt_idx, tgt_pos = make_batch(tgt_shape=(2, 2))
    out = model(images, ctx_idx, tgt_idx, tgt_pos)
    out["loss"].backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in model.level_heads.heads)
    assert "level_heads" in model.trainable_modules()


def test_grid_windows_average_every_patch_of_the_window_the_block_reaches_into():
    # A 2 x 2 block at rows 1-2, cols 1-2 of a 4 x 4 grid (patches 5, 6, 9, 10), feature = patch index:
    # at level 1 each block patch lies in a different 2 x 2 window, whose target is the whole window's mean.
    features = torch.arange(16.0).reshape(1, 16, 1)
    windows = grid_cells(1, (4, 4))
    assert pool_target_blocks(features, windows)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    tgt_idx = torch.tensor([5, 6, 9, 10, 5]).reshape(1, 1, 5)  # the last token is padding
    valid = torch.tensor([True, True, True, True, False])
    cells = block_grid_cells(tgt_idx, valid, 1, (4, 4))  # (1, 4, 5)
    assert cells[0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    # A window as large as the grid has one cell: the image's mean feature.
    assert pool_target_blocks(features, grid_cells(2, (4, 4)))[0, :, 0].tolist() == [7.5]
    assert block_grid_cells(tgt_idx, valid, 2, (4, 4))[0].tolist() == [[1, 1, 1, 1, 0]]


def test_grid_window_loss_is_zero_when_the_block_predicts_its_windows_means():
    torch.manual_seed(0)
    features = torch.randn(1, 16, 8)
    tgt_idx, valid = torch.tensor([[[4, 5, 8, 9, 12, 13]]]), torch.ones(6, dtype=torch.bool)  # 3 x 2 block
    cells = block_grid_cells(tgt_idx, valid, 1, (4, 4))
    target = pool_target_blocks(features, grid_cells(1, (4, 4)))  # (1, 4, 8)
    window_of_token = cells[0].argmax(dim=0)  # (6,)
    prediction = target[0, window_of_token].unsqueeze(0)  # each token predicts its window's mean
    loss = level_loss(pool_target_blocks(prediction, cells), target, cells.sum(dim=-1), F.mse_loss, normalize=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert cells.sum(dim=-1).tolist() == [[2, 0, 4, 0]]  # the block's patches per window weigh its cells


def test_grid_windows_train_the_level_heads_and_differ_from_block_windows():
    torch.manual_seed(0)
    config = dict(SMALL_MODEL, num_levels=3, level_weights=[1.0, 0.5, 0.25], level_heads=True)
    grid_model = build_model(ModelConfig(**config, level_windows="grid"))
    block_model = build_model(ModelConfig(**config))
    block_model.load_state_dict(grid_model.state_dict())
    batch = make_batch(tgt_shape=(2, 2))
    grid_out, block_out = grid_model(*batch), block_model(*batch)
    torch.testing.assert_close(grid_out["level_losses"][0], block_out["level_losses"][0])  # level 0 is I-JEPA's
    assert not torch.allclose(grid_out["level_losses"][1:], block_out["level_losses"][1:])
    grid_out["loss"].backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in grid_model.level_heads.heads)


def test_variance_term_pushes_only_dims_whose_std_is_below_one():
    # dim 0: std sqrt(2) over the batch, no penalty; dim 1: constant, std sqrt(eps) = 0.01, penalty 0.99
    variance, covariance = variance_covariance(torch.tensor([[1.0, 3.0], [-1.0, 3.0]]))
    assert variance.item() == pytest.approx(0.99 / 2)
    assert covariance.item() == pytest.approx(0.0)


def test_covariance_term_is_the_squared_off_diagonal_covariance_over_dims():
    # Two identical dims: covariance matrix [[2, 2], [2, 2]], off-diagonal squares 4 + 4, over D = 2
    variance, covariance = variance_covariance(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    assert covariance.item() == pytest.approx(4.0)
    assert variance.item() == pytest.approx(0.0)


def test_variance_covariance_weights_add_their_terms_on_the_mean_context_embedding():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=[1.0, 0.5], var_weight=2.0,
                                    cov_weight=0.5))
    images, ctx_idx, tgt_idx, tgt_pos = batch = make_batch(batch_size=4)
    out = model(*batch)
    variance, covariance = variance_covariance(model.context_encoder(images, ctx_idx).mean(dim=1))
    levels = out["level_losses"] @ torch.tensor([1.0, 0.5])
    torch.testing.assert_close(out["loss"].detach(), levels + 2.0 * variance.detach() + 0.5 * covariance.detach())


def test_a_checkpoint_written_before_a_model_key_existed_matches_the_default_architecture():
    record = ModelConfig(**SMALL_MODEL).as_record()
    older = {k: v for k, v in record.items() if k not in ("level_heads", "normalize_levels")}
    assert architecture_differences(record, older) == []
    assert architecture_differences(ModelConfig(**SMALL_MODEL, level_heads=True).as_record(), older) == [
        "level_heads: run has True, checkpoint has False"]
    with pytest.raises(UserError, match="unknown keys newer_key"):
        architecture_differences(record, dict(record, newer_key=1))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_levels=3, level_weights=[1.0, 0.5]), "level_weights"),
    (dict(num_levels=1, level_weights=[1.0], level_heads=True), "level_heads"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_depths=[12]), "level_depths"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_depths=[0, 12]), "level_depths"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_depths=[13, 12]), "level_depths"),
    (dict(num_levels=1, level_weights=[1.0], loss="l1"), "loss"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_windows="grid"), "level_heads"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_windows="image", level_heads=True), "level_windows"),
])
def test_inconsistent_level_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_model(ModelConfig(**SMALL_MODEL, **kwargs))


def test_identical_images_give_zero_target_std_across_the_batch():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0]))
    images, ctx_idx, tgt_idx, tgt_pos = make_batch(batch_size=2)
    images[1] = images[0]
    ctx_idx[1] = ctx_idx[0]
    tgt_idx[:, 1] = tgt_idx[:, 0]
    out = model(images, ctx_idx, tgt_idx, tgt_pos)
    assert out["target_std"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["pred_std"].item() == pytest.approx(0.0, abs=1e-5)
    out = model(*make_batch(batch_size=2))
    assert out["target_std"].item() > 0.1 and not out["target_std"].requires_grad


# ---------------------------------------------------------------------------------------------
# Target encoder and optimisation


def test_target_encoder_gets_no_gradient_and_is_not_optimised():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=[1.0, 0.5]))
    model(*make_batch())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.context_encoder.parameters())
    optimised = {id(p) for group in model.param_groups(0.05) for p in group["params"]}
    assert not optimised & {id(p) for p in model.target_encoder.parameters()}
    assert "target_encoder" not in model.trainable_modules()


def test_param_groups_decay_only_matrices():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=[1.0, 0.5], level_depths=[6, 12]))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 or p is model.predictor.mask_token for p in no_decay["params"])
    assert any(p is model.predictor.mask_token for p in no_decay["params"])
    trainable = [p for m in model.trainable_modules().values() for p in m.parameters()]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert any(p is model.level_heads.heads[0].weight for p in decay["params"])


def test_ema_with_momentum_0_copies_and_with_momentum_1_freezes():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0]))
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.target_encoder.parameters()))
    model.update_target(0.0)
    assert all(torch.equal(t, c) for t, c in zip(model.target_encoder.parameters(),
                                                  model.context_encoder.parameters()))


def test_ema_moves_the_target_by_one_minus_momentum():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0]))
    target, context = model.target_encoder.norm.bias, model.context_encoder.norm.bias
    with torch.no_grad():
        context.fill_(1.0)
        target.fill_(0.0)
    model.update_target(0.9)
    torch.testing.assert_close(target, torch.full_like(target, 0.1))


def test_drop_path_is_off_in_the_target_encoder():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0], drop_path=0.5)).train()
    assert model.context_encoder.blocks[-1].drop_path == 0.5
    assert all(block.drop_path == 0.0 for block in model.target_encoder.blocks)


def test_model_config_records_the_build_kwargs():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=[1.0, 0.5], level_depths=[]))
    rebuilt = build_model(ModelConfig.from_record(model.model_config))
    assert rebuilt.model_config == model.model_config
    assert set(rebuilt.state_dict()) == set(model.state_dict())


def test_loss_falls_when_overfitting_one_small_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=[1.0, 0.5]))
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3)
    batch = make_batch(batch_size=4, tgt_shape=(2, 2))
    losses = []
    for _ in range(20):
        loss = model(*batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_target(0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
