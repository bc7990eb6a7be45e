"""The ViT encoder, the predictor and the H-JEPA model around them (hjepa.vit, hjepa.predictor,
hjepa.model); its objective, level by level, is tests/test_objective.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from hjepa.checkpoint import architecture_differences
from hjepa.errors import UserError
from hjepa.model import ModelConfig, build_model
from hjepa.vit import ARCHS, Attention, VisionTransformer, build_encoder
from model_batches import SMALL_MODEL, make_batch, one_torch_thread  # noqa: F401 (an autouse fixture)

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
    (dict(num_levels=2, level_weights=[1.0, -0.5]), "non-negative"),
    (dict(num_levels=2, level_weights=[0.0, 0.0]), "positive sum"),
    (dict(num_levels=1, level_weights=[1.0], level_heads=True), "level_heads"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_depths=[12]), "level_depths"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_depths=[0, 12]), "level_depths"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_depths=[13, 12]), "level_depths"),
    (dict(num_levels=1, level_weights=[1.0], loss="l1"), "loss"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_windows="grid"), "level_heads"),
    (dict(num_levels=2, level_weights=[1.0, 0.5], level_windows="image", level_heads=True), "level_windows"),
    (dict(num_levels=1, level_weights=[1.0], target_blocks=0), "target_blocks"),
    (dict(num_levels=1, level_weights=[1.0], target_blocks=13), "target_blocks"),
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
