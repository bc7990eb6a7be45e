"""What the writer tests share: running a writer CLI in this process, and reading a beton's stored
images straight from the file."""
import importlib

import cv2
import numpy as np
import pytest


def run_cli(name, *args):
    """Run write_datasets/<name>.py's main in this process (what `python -m write_datasets.<name>` runs);
    return its manifest."""
    return importlib.import_module(f"write_datasets.{name}").main(list(args))


def cli_error(capsys, name, *args):
    """The one-line error message of a CLI run that must fail with exit status 1."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(name, *args)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def read_beton(path):
    """(images as (H, W, 3) uint8 arrays, labels, dataset_idx or None) straight from the file."""
    from ffcv.reader import Reader

    reader = Reader(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    table = np.sort(reader.alloc_table, order="ptr")
    images = []
    for meta in reader.metadata["f0"]:
        start = int(meta["data_ptr"])
        size = int(table["size"][np.searchsorted(table["ptr"], start)])
        payload = np.array(data[start:start + size])
        if meta["mode"] == 0:  # jpg
            images.append(cv2.cvtColor(cv2.imdecode(payload, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        else:  # raw
            images.append(payload.reshape(meta["height"], meta["width"], 3))
    labels = np.array(reader.metadata["f1"])
    dataset_idx = np.array(reader.metadata["f2"]) if "dataset_idx" in reader.field_names else None
    return images, labels, dataset_idx


def mean_abs_error(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
