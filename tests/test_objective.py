"""The H-JEPA objective (hjepa.model): target blocks, the pooled levels on block and grid windows,
their weighting and normalisation, I-JEPA's loss at one level, and the variance/covariance terms."""
import pytest
import torch
import torch.nn.functional as F

from hjepa.model import (ModelConfig, block_grid_cells, build_model, gather_target_blocks, grid_cells, level_cells,
                         level_loss, pool_target_blocks, variance_covariance)
from model_batches import SMALL_MODEL, block_positions, make_batch, one_torch_thread  # noqa: F401 (autouse fixture)


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


def test_with_block_windows_level_0_is_level_1_plus_the_error_left_within_each_cell():
    # Unnormalised MSE on one 3 x 5 block: every patch's squared error splits into its cell's mean
    # error and its deviation from it, so the level-0 loss is the (patch-count-weighted) level-1 loss
    # plus the within-cell spread of the error. A block-window level asks for nothing level 0 does not
    # already ask; it re-weights the cell-mean part of the same error (the predictor that minimises
    # one minimises the other).
    torch.manual_seed(0)
    pos = block_positions(3, 5)
    prediction, target = torch.randn(1, 15, 8), torch.randn(1, 15, 8)
    level0 = level_loss(prediction, target, torch.ones(15), F.mse_loss, normalize=False)
    cells = level_cells(pos, 1, (8, 8))
    weights = cells.sum(dim=1)
    level1 = level_loss(pool_target_blocks(prediction, cells), pool_target_blocks(target, cells), weights,
                        F.mse_loss, normalize=False)
    error = prediction - target  # (1, 15, D)
    cell_of = cells.argmax(dim=0)  # (15,): each real patch's cell
    cell_mean_error = pool_target_blocks(error, cells)[0, cell_of]  # (15, D)
    within = ((error[0] - cell_mean_error) ** 2).mean()
    assert level0.item() == pytest.approx(level1.item() + within.item())


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


def test_loss_is_the_mean_of_level_losses_under_the_relative_level_weights():
    model = build_model(ModelConfig(**SMALL_MODEL, num_levels=3, level_weights=[1.0, 0.5, 0.25]))
    out = model(*make_batch(tgt_shape=(3, 3)))
    assert out["level_losses"].shape == (3,)
    expected = out["level_losses"] @ torch.tensor([4 / 7, 2 / 7, 1 / 7])
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_level_weights_are_relative_so_scaling_them_leaves_the_loss_unchanged():
    losses = []
    for weights in ([1.0, 0.5], [2.0, 1.0]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**SMALL_MODEL, num_levels=2, level_weights=weights))
        losses.append(model(*make_batch(tgt_shape=(3, 3)))["loss"])
    torch.testing.assert_close(losses[0], losses[1])


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


def test_target_blocks_average_the_last_blocks_layer_normed_outputs_like_data2vec():
    torch.manual_seed(0)
    ijepa = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0]))
    data2vec = build_model(ModelConfig(**SMALL_MODEL, num_levels=1, level_weights=[1.0], target_blocks=3))
    data2vec.target_encoder.load_state_dict(ijepa.target_encoder.state_dict())
    images = make_batch()[0]
    encoder = ijepa.target_encoder
    blocks = encoder.forward_blocks(images)  # 12 x (B, N, 192)
    final = F.layer_norm(encoder.norm(blocks[-1]), (192,))
    torch.testing.assert_close(ijepa.target_grid_features(images), {12: final})  # I-JEPA's target, unchanged
    mean_of_three = (F.layer_norm(blocks[9], (192,)) + F.layer_norm(blocks[10], (192,)) + final) / 3
    expected = F.layer_norm(mean_of_three, (192,))
    torch.testing.assert_close(data2vec.target_grid_features(images), {12: expected})
    assert not torch.allclose(expected, final, atol=1e-2)
    assert torch.allclose(expected.std(dim=-1, unbiased=False), torch.ones(()), atol=1e-3)  # unit scale per token


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
    levels = out["level_losses"] @ torch.tensor([2 / 3, 1 / 3])
    torch.testing.assert_close(out["loss"].detach(), levels + 2.0 * variance.detach() + 0.5 * covariance.detach())
