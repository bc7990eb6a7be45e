"""Write any class-per-folder image tree to a .beton.

  python write_datasets/imagefolder.py --cfg.data_dir=/data/flowers --cfg.split=train \\
      --cfg.write_path=betons/flowers_train.beton

cfg.data_dir is the folder that contains <split>/<class>/<images> (pass --cfg.split=. when the class
folders sit directly in data_dir). Labels are the positions of the sorted class folder names.
Files are samples by their extension (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp, any case),
as in torchvision's ImageFolder; other files are ignored and listed in the manifest. Unreadable
images are skipped with a warning and listed in the manifest.
Stored size: shorter side cfg.short_side (default 256, never enlarged), as torchvision's Resize.
Beside the beton: <name>.json (manifest) and <name>.beton.params.json (this config).
"""
import os

from hjepa.errors import exit_on_user_error
from hjepa.sources import image_folder_samples
from hjepa.writers import write_split, writer_config


@exit_on_user_error
def main(argv=None):
    cfg = writer_config(__doc__, argv)
    samples, class_names, ignored = image_folder_samples(cfg["cfg.data_dir"], cfg["cfg.split"])
    dataset = os.path.basename(os.path.normpath(os.path.abspath(cfg["cfg.data_dir"])))
    return write_split(cfg, samples, dataset=dataset, class_names=class_names, ignored_files=ignored)


if __name__ == "__main__":
    main()
