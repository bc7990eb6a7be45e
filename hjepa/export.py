"""An encoder as a .safetensors file that timm loads, with its architecture as JSON beside it.

hjepa.vit follows timm's `VisionTransformer` layout and names: no class token, qkv with bias, MLP ratio
4 with exact GELU, LayerNorm eps 1e-6, pre-norm blocks and a final `norm`. Built with `timm_kwargs`
(no class token, `global_pool='avg'`, no `fc_norm`, no head), timm's model takes the exported state
dict with every key matched, its `forward_features` equals our encoder's output, and its `forward` is
the average-pooled features the linear probe uses. The fixed sin-cos `pos_embed` is stored as a
tensor; timm loads it into its (learnable) `pos_embed` parameter. timm is not needed to export.
"""
import json
import os

import torch
from safetensors.torch import save_file

FORMAT = "hjepa-encoder-v1"


def timm_kwargs(encoder):
    """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` that rebuild `encoder`."""
    return dict(img_size=encoder.grid_size * encoder.patch_size, patch_size=encoder.patch_size,
                embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                mlp_ratio=encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim, qkv_bias=True,
                class_token=False, global_pool="avg", fc_norm=False, num_classes=0)


def architecture_path(weights_path):
    """encoder.safetensors -> encoder.json"""
    return os.path.splitext(weights_path)[0] + ".json"


def export_encoder(encoder, path, source):
    """Write `encoder`'s weights to `path` (.safetensors) and its architecture to architecture_path(path),
    each atomically. `source` (a dict: checkpoint, step, encoder role, ...) goes into the JSON; returns the JSON."""
    from hjepa.loaders import IMAGENET_MEAN, IMAGENET_STD  # imports ffcv (seconds): not for --help or a bad path

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.state_dict().items()}
    info = {"format": FORMAT, "weights": os.path.basename(path), **source,
            "timm_class": "timm.models.vision_transformer.VisionTransformer", "timm_kwargs": timm_kwargs(encoder),
            "input": {"image_size": encoder.grid_size * encoder.patch_size, "channels": "RGB",
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "scaling": "pixels / 255, then (x - mean) / std per channel"}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    weights_tmp, json_tmp = (f"{p}.tmp.{os.getpid()}" for p in (path, architecture_path(path)))
    save_file(state, weights_tmp)
    with open(json_tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(weights_tmp, path)
    os.replace(json_tmp, architecture_path(path))
    return info
