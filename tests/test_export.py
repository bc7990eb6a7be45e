"""eval/export.py: a checkpoint's encoder as .safetensors + JSON that timm loads with identical outputs."""
import json

import pytest
import torch
from safetensors.torch import load_file

from eval import export as export_tool
from hjepa.checkpoint import save_checkpoint
from hjepa.model import ModelConfig, build_model
from hjepa.vit import sincos_pos_embed_2d

timm = pytest.importorskip("timm")  # a dev dependency: present wherever the test suite is installed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint of a 32 px vit_micro whose context and target encoders differ."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vit_micro", patch_size=4, image_size=32, predictor_embed_dim=48, predictor_depth=1,
                        predictor_num_heads=2))
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("export") / "checkpoint.pt"
    save_checkpoint({"model_config": model.model_config, "context_encoder": model.context_encoder.state_dict(),
                     "target_encoder": model.target_encoder.state_dict(), "step": 7, "epoch": 1}, str(path))
    return path, model


def timm_model_from(json_path, weights_path):
    """What the README tells a user to write (timm's own classes, no hjepa code)."""
    model = timm.models.vision_transformer.VisionTransformer(**json.loads(json_path.read_text())["timm_kwargs"])
    model.load_state_dict(load_file(str(weights_path)))  # strict: every key matches
    return model.eval()


@pytest.mark.parametrize("role", ["target", "context"])
def test_exported_encoder_gives_timm_the_same_outputs(checkpoint, role, tmp_path):
    path, model = checkpoint
    out = tmp_path / "encoder.safetensors"
    export_tool.main([f"--eval.checkpoint={path}", f"--eval.encoder={role}", f"--eval.out={out}"])
    timm_model = timm_model_from(tmp_path / "encoder.json", out)
    ours = getattr(model, f"{role}_encoder").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = ours(x)  # (B, N, D)
        assert torch.allclose(timm_model.forward_features(x), tokens, atol=1e-5)
        assert torch.allclose(timm_model(x), tokens.mean(dim=1), atol=1e-5)  # (B, D): the probe's pooling


def test_export_at_another_size_stores_the_sincos_position_embedding_of_its_grid(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "encoder_48.safetensors"
    info = export_tool.main([f"--eval.checkpoint={path}", "--eval.image_size=48", f"--eval.out={out}"])
    assert info["timm_kwargs"]["img_size"] == 48
    timm_model = timm_model_from(tmp_path / "encoder_48.json", out)
    assert torch.equal(timm_model.pos_embed.detach(), sincos_pos_embed_2d(96, 48 // 4).unsqueeze(0))  # (1, 144, D)
    trained = model.target_encoder.state_dict()
    exported = load_file(str(out))
    assert all(torch.equal(exported[k], trained[k]) for k in trained if k != "pos_embed")


@pytest.mark.parametrize("content,fragment", [(None, "checkpoint not found"),
                                              (b"not a zip file" * 100, "not a readable hjepa checkpoint")])
def test_missing_or_unreadable_checkpoint_is_one_error_line_and_writes_nothing(content, fragment, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        export_tool.main([f"--eval.checkpoint={path}", f"--eval.out={tmp_path / 'e.safetensors'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["checkpoint.pt"])
