"""Export a trained encoder as .safetensors that timm loads, with its architecture as JSON beside it.

    python eval/export.py --eval.checkpoint=runs/RUN/checkpoint.pt --eval.out=encoder.safetensors
    python -m eval.export --eval.checkpoint=runs/RUN/checkpoint.pt --eval.encoder=context

Writes the target encoder (or --eval.encoder=context) to --eval.out (default
<checkpoint dir>/<encoder>_encoder.safetensors) and its timm architecture to the same name with .json.
--eval.image_size exports for another input size (the sin-cos position embedding is rebuilt for its
grid; default: the training size). Load it into timm (no network needed):

    import json, safetensors.torch, timm
    model = timm.models.vision_transformer.VisionTransformer(**json.load(open("encoder.json"))["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))

model(x) is the average-pooled feature vector (B, D), model.forward_features(x) the tokens (B, N, D).
"""
import os

from hjepa.checkpoint import encoder_from_checkpoint, load_training_checkpoint
from hjepa.config import config_from_cli
from hjepa.errors import UserError, exit_on_user_error
from hjepa.export import architecture_path, export_encoder

READS = ("eval.checkpoint", "eval.encoder", "eval.image_size", "eval.out")


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv, reads=READS)
    checkpoint, role = cfg["eval.checkpoint"], cfg["eval.encoder"]
    if not checkpoint:
        raise UserError("eval.checkpoint is empty: give --eval.checkpoint=runs/<run>/checkpoint.pt")
    out = cfg["eval.out"] or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"{role}_encoder.safetensors")
    if not out.endswith(".safetensors"):
        raise UserError(f"eval.out must end in .safetensors, got '{out}'")
    ckpt, model_config = load_training_checkpoint(checkpoint)
    encoder = encoder_from_checkpoint(ckpt, role, checkpoint, image_size=cfg["eval.image_size"] or None)
    source = {"encoder": role, "arch": model_config["arch"], "checkpoint": os.path.abspath(checkpoint),
              "step": ckpt.get("step"), "epoch": ckpt.get("epoch")}
    info = export_encoder(encoder, out, source)
    print(f"wrote {out} ({model_config['arch']} {role} encoder, {info['input']['image_size']} px) "
          f"and {architecture_path(out)}", flush=True)
    return info


if __name__ == "__main__":
    main()
