"""Write CIFAR-100 (official "python version" pickles) to a .beton.

  python write_datasets/cifar100.py --cfg.data_dir=/data --cfg.split=train \\
      --cfg.write_path=betons/cifar100_train.beton

cfg.data_dir is the folder that contains cifar-100-python/ (holding train, test and meta), or that folder itself.
Splits: train (50,000 images), test (10,000). Labels: the 100 fine labels (coarse labels are not kept). Images stay 32x32.
The pickles are read directly (torchvision's class would check md5 sums); only numpy arrays and
plain containers are unpickled. Missing files: the error says what to put where, or pass
--cfg.download=1 to fetch the official archive into data_dir.
Beside the beton: <name>.json (manifest) and <name>.beton.params.json (this config).
"""
from hjepa.errors import exit_on_user_error
from hjepa.sources import cifar_samples, download
from hjepa.writers import write_split, writer_config


@exit_on_user_error
def main(argv=None):
    cfg = writer_config(__doc__, argv)
    if cfg["cfg.download"]:
        download("cifar100", cfg["cfg.data_dir"])
    samples, class_names = cifar_samples(cfg["cfg.data_dir"], cfg["cfg.split"], variant="cifar100")
    return write_split(cfg, samples, dataset="cifar100", class_names=class_names)


if __name__ == "__main__":
    main()
