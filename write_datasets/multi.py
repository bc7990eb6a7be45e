"""Combine single-dataset betons into one beton for multi-dataset training.

  python write_datasets/multi.py \\
      --cfg.members=imagenet100=betons/imagenet100_train.beton,stl10=betons/stl10_train_unlabeled.beton,cifar100=betons/cifar100_train.beton \\
      --cfg.write_path=betons/mix_train.beton

cfg.members lists name=path pairs in order; the names are what --data.mixture refers to. The output
has fields image, label, dataset_idx (= member position); member d holds the contiguous index range
given in the manifest's "members" (name, index_start, index_end, num_samples, source, source checksum).
Stored image bytes are copied as they are (no decode/re-encode). Every member needs its manifest.
Beside the beton: <name>.json (manifest) and <name>.beton.params.json (this config).
"""
from hjepa.beton import combine_betons, parse_members
from hjepa.config import save_config
from hjepa.errors import exit_on_user_error
from hjepa.writers import writer_config


@exit_on_user_error
def main(argv=None):
    cfg = writer_config(__doc__, argv)
    members = parse_members(cfg["cfg.members"])
    manifest = combine_betons(members, cfg["cfg.write_path"], split=cfg["cfg.split"],
                              num_workers=cfg["cfg.num_workers"], chunk_size=cfg["cfg.chunk_size"])
    save_config(cfg, cfg["cfg.write_path"] + ".params.json", sections=["cfg"])
    for m in manifest["members"]:
        print(f"  {m['name']:<12} dataset_idx {manifest['members'].index(m)}  "
              f"indices [{m['index_start']}, {m['index_end']})  {m['num_samples']} images")
    return manifest


if __name__ == "__main__":
    main()
