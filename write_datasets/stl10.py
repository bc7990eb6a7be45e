"""Write STL-10 (official binary release) to a .beton.

  python write_datasets/stl10.py --cfg.data_dir=/data --cfg.split=train+unlabeled \\
      --cfg.write_path=betons/stl10_train_unlabeled.beton

cfg.data_dir is the folder that contains stl10_binary/ (holding train_X.bin, train_y.bin,
test_X.bin, test_y.bin, unlabeled_X.bin), or that folder itself. Splits: train (5,000), test (8,000),
unlabeled (100,000), train+unlabeled (105,000, the one the multi-dataset mix uses). Images are 96x96;
labels 1..10 become 0..9 and unlabeled images get -1. Missing files: the error says what to put
where, or pass --cfg.download=1 to fetch the official archive (2.6 GB) into data_dir.
Beside the beton: <name>.json (manifest) and <name>.beton.params.json (this config).
"""
from hjepa.errors import exit_on_user_error
from hjepa.sources import download, stl10_samples
from hjepa.writers import write_split, writer_config


@exit_on_user_error
def main(argv=None):
    cfg = writer_config(__doc__, argv)
    if cfg["cfg.download"]:
        download("stl10", cfg["cfg.data_dir"])
    samples, class_names = stl10_samples(cfg["cfg.data_dir"], cfg["cfg.split"])
    return write_split(cfg, samples, dataset="stl10", class_names=class_names)


if __name__ == "__main__":
    main()
