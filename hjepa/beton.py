"""Writing `.beton` files (FFCV's format) atomically, with a JSON manifest beside each one.

Every single-dataset beton has the fields `image` (RGBImageField) and `label` (IntField, -1 =
unlabeled); a combined beton (`combine_betons`) adds `dataset_idx`. Beside `x.beton` sits `x.json`:
dataset, split, counts, class names, the storage policy, source, creation time, size and a blake2b
checksum of the beton, the images that were skipped as unreadable and the files ignored as non-images.

What is stored (the resize policy) lives in hjepa.storage.

Atomicity: the beton is written to `<write_path>.partial` in the same folder, fsynced, and renamed
with `os.replace` only when complete (then the folder is fsynced), so an interrupted run (even
SIGKILL or a power cut) never leaves a file at `write_path` that looks complete. The old manifest is
removed first and the new one written last, the same way.
"""
import datetime
import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager, suppress
from unittest import mock

import numpy as np
from tqdm import tqdm

from hjepa.errors import UserError
from hjepa.storage import (IMAGE_RESIZE, check_free_space, estimate_beton_bytes, is_path_source, load_for_storage,
                           probe_image, storage_size)

MANIFEST_FORMAT = "hjepa-beton-manifest-v1"
CHECKSUM_ALGORITHM = "blake2b"

# ----------------------------------------------------------------------------------------------
# Samples


def _check_array(source, index):
    if not (isinstance(source, np.ndarray) and source.dtype == np.uint8 and source.ndim == 3
            and source.shape[2] == 3):
        raise ValueError(f"sample {index}: image must be a file path or an HxWx3 uint8 array, "
                         f"got {type(source).__name__} {getattr(source, 'shape', '')}")


# ----------------------------------------------------------------------------------------------
# Manifests


def manifest_path(beton_path):
    """`x.beton` -> `x.json` (same folder)."""
    root, _ = os.path.splitext(os.fspath(beton_path))
    return root + ".json"


def file_checksum(path, chunk_bytes=1 << 24):
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path):
    """Flush a file's (or a folder's entries') data to the disk, so a rename after it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp_path, path):
    """fsync tmp_path, rename it to path, fsync the folder (which records the rename)."""
    _fsync(tmp_path)
    os.replace(tmp_path, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _write_json_atomic(path, content):
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    _replace_durably(tmp, path)


def _read_header(beton_path):
    """The beton's FFCV header; UserError if the file is not a beton."""
    from ffcv.types import CURRENT_VERSION, HeaderType

    if os.path.getsize(beton_path) < HeaderType.itemsize:
        raise UserError(f"{beton_path} is not a .beton file (too short)")
    header = np.fromfile(beton_path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise UserError(f"{beton_path} is not a .beton file (format version {header['version']})")
    return header


def beton_num_samples(beton_path):
    """Sample count from the beton header; UserError if the file is not a beton."""
    return int(_read_header(beton_path)["num_samples"])


def read_manifest(beton_path, verify_checksum=False):
    """The manifest of `beton_path` as a dict.

    UserError when the beton or its manifest is missing, or they disagree (size, sample count,
    and with verify_checksum=True the checksum) -- e.g. a truncated copy or a stale manifest.
    """
    beton_path = os.fspath(beton_path)
    if not os.path.isfile(beton_path):
        raise UserError(f"beton not found: {beton_path} (write it with write_datasets/*.py)")
    path = manifest_path(beton_path)
    if not os.path.isfile(path):
        raise UserError(f"manifest missing: {path} should sit beside {beton_path}; rewrite the beton "
                        "with write_datasets/*.py")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest {path} is not valid JSON: {e}")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"manifest {path} is not a {MANIFEST_FORMAT} file")
    size = os.path.getsize(beton_path)
    if size != manifest["size_bytes"]:
        raise UserError(f"{beton_path} is {size} bytes but its manifest says {manifest['size_bytes']} "
                        "(truncated copy or stale manifest)")
    num_samples = beton_num_samples(beton_path)
    if num_samples != manifest["num_samples"]:
        raise UserError(f"{beton_path} holds {num_samples} samples but its manifest says "
                        f"{manifest['num_samples']}")
    if verify_checksum and file_checksum(beton_path) != manifest["checksum"]["hex"]:
        raise UserError(f"{beton_path} does not match the checksum in {path}")
    return manifest


# ----------------------------------------------------------------------------------------------
# Writing


class _SampleDataset:
    """What FFCV's DatasetWriter indexes from its worker processes: (image, label).

    Each file is decoded here, once. One that fails (truncated, corrupt) must not raise -- an
    exception kills an FFCV worker and the writer's main loop then waits forever -- so we store a
    placeholder, mark the sample in shared memory, and drop it from the beton afterwards.
    """

    def __init__(self, samples, *, short_side, max_side):
        self.samples = samples
        self.short_side, self.max_side = short_side, max_side
        self.failed = multiprocessing.RawArray("b", len(samples))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        source, label = self.samples[index]
        try:
            return load_for_storage(source, short_side=self.short_side, max_side=self.max_side), label
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            self.failed[index] = 1
            return np.zeros((8, 8, 3), np.uint8), label  # dropped before the beton is renamed into place


def _page_size(stored_sizes, estimated_bytes):
    # A sample must fit in one FFCV page (memory_allocator.malloc); a raw image needs H*W*3 bytes.
    # FFCV's default 8 MiB pages suit big files; small ones use 2 MiB, since every writer process
    # pads its last page and the data region starts page-aligned.
    from ffcv.writer import MIN_PAGE_SIZE

    default = 4 * MIN_PAGE_SIZE if estimated_bytes > 2**30 else MIN_PAGE_SIZE
    needed = max(default, 2 * 3 * max(width * height for width, height in stored_sizes))
    return 1 << math.ceil(math.log2(needed))


@contextmanager
def _ffcv_progress(desc, enabled):
    # ffcv.writer draws its own tqdm bar with no options; give it a label, or silence it.
    import ffcv.writer

    bar = functools.partial(tqdm, desc=desc, unit="img", disable=not enabled, file=sys.stderr)
    with mock.patch.object(ffcv.writer, "tqdm", bar):
        yield


def _probe_images(paths, num_workers, progress):
    """[((width, height) or None, reason or None)] for `paths`, headers read in parallel."""
    bar = functools.partial(tqdm, total=len(paths), desc="reading image headers", unit="img",
                            disable=not progress, file=sys.stderr)
    if num_workers <= 1 or len(paths) < 4096:
        return [probe_image(p) for p in bar(paths)]
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        return list(bar(pool.imap(probe_image, paths, chunksize=256)))


def _write_atomically(write_path, fields, dataset, finish, *, num_workers, chunk_size, page_size, progress):
    """Write `dataset` to <write_path>.partial with FFCV, get the manifest from finish(tmp_path),
    checksum, rename into place, write the manifest; return it. On any failure the temp file goes."""
    from ffcv.writer import DatasetWriter

    tmp_path = write_path + ".partial"
    if os.path.exists(tmp_path):
        print(f"note: overwriting {tmp_path} left by an interrupted run", file=sys.stderr)
    start = time.perf_counter()
    try:
        writer = DatasetWriter(tmp_path, fields, page_size=page_size, num_workers=num_workers)
        with _ffcv_progress(f"writing {os.path.basename(write_path)}", progress):
            writer.from_indexed_dataset(dataset, chunksize=chunk_size)  # truncates tmp_path first
        manifest = finish(tmp_path)
        manifest["size_bytes"] = os.path.getsize(tmp_path)
        manifest["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "hex": file_checksum(tmp_path)}
        if os.path.exists(manifest_path(write_path)):
            os.remove(manifest_path(write_path))  # never let a stale manifest describe the new beton
        _replace_durably(tmp_path, write_path)
        _write_json_atomic(manifest_path(write_path), manifest)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    seconds = time.perf_counter() - start
    print(f"wrote {manifest['num_samples']} images to {write_path} in {seconds:.1f} s "
          f"({len(dataset) / seconds:.0f} images/s)", flush=True)
    return manifest


def _warn_unreadable(bad_images):
    for path, reason in bad_images:
        print(f"warning: skipping unreadable image {path} ({reason})", file=sys.stderr)


def _check_bad_fraction(bad_images, num_samples, max_bad_fraction):
    if len(bad_images) > max_bad_fraction * num_samples:
        raise UserError(f"{len(bad_images)} of {num_samples} images are unreadable (more than "
                        f"max_bad_fraction={max_bad_fraction}); first: {bad_images[0][0]}")


def write_beton(samples, write_path, *, dataset, split, class_names, source, short_side=256, max_side=None,
                jpeg_quality=90, write_mode="jpg", compress_probability=0.5, num_workers=1,
                chunk_size=100, max_bad_fraction=0.001, ignored_files=(), progress=True):
    """Write (image_source, label) samples to `write_path` with fields `image`, `label`; return the manifest.

    image_source: a file path (decoded with PIL, converted to RGB) or an (H, W, 3) uint8 array.
    Images are resized per storage_size (shorter side short_side, never enlarged; longer side
    capped at max_side when given) and stored per write_mode (jpg | raw | proportion). Unreadable
    files are skipped with a warning and listed in the manifest's `bad_images`; more than
    max_bad_fraction of them is a UserError. ignored_files (non-image files the source reader left
    out) are counted and listed in the manifest.
    """
    from ffcv.fields import IntField, RGBImageField

    write_path = os.fspath(write_path)
    samples = list(samples)
    if not samples:
        raise UserError(f"no samples to write for {dataset} split '{split}' (source: {source})")
    for index, (image_source, label) in enumerate(samples):
        if not is_path_source(image_source):
            _check_array(image_source, index)
        if not -1 <= label < len(class_names):
            raise ValueError(f"sample {index}: label {label} outside -1..{len(class_names) - 1}")
    if write_mode not in ("jpg", "raw", "proportion"):
        raise ValueError(f"write_mode must be jpg, raw or proportion, got {write_mode!r}")
    max_side = max_side or None
    os.makedirs(os.path.dirname(os.path.abspath(write_path)), exist_ok=True)

    paths = [s for s, _ in samples if is_path_source(s)]
    probed = dict(zip(paths, _probe_images(paths, num_workers, progress))) if paths else {}
    bad_images = [(p, reason) for p, (_, reason) in probed.items() if reason is not None]
    _warn_unreadable(bad_images)
    num_given = len(samples)
    _check_bad_fraction(bad_images, num_given, max_bad_fraction)
    samples = [(s, int(label)) for s, label in samples if not (is_path_source(s) and probed[s][1] is not None)]
    if not samples:
        raise UserError(f"no readable images for {dataset} split '{split}' (source: {source})")
    stored_sizes = [storage_size(*(probed[s][0] if is_path_source(s) else s.shape[1::-1]),
                                 short_side=short_side, max_side=max_side) for s, _ in samples]
    estimated_bytes = estimate_beton_bytes(stored_sizes, write_mode=write_mode,
                                           compress_probability=compress_probability)
    check_free_space(write_path, estimated_bytes)

    fields = {
        # max_resolution=None: FFCV's own resize (longest side, INTER_AREA) stays off; ours ran already.
        "image": RGBImageField(write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    data = _SampleDataset(samples, short_side=short_side, max_side=max_side)
    page_size = _page_size(stored_sizes, estimated_bytes)

    def finish(tmp_path):
        nonlocal samples
        failed = set(np.flatnonzero(np.frombuffer(data.failed, np.int8)).tolist())
        if failed:
            late = [(samples[i][0], "failed to decode") for i in sorted(failed)]
            _warn_unreadable(late)
            bad_images.extend(late)
            _check_bad_fraction(bad_images, num_given, max_bad_fraction)
            kept = [i for i in range(len(samples)) if i not in failed]
            if not kept:
                raise UserError(f"no readable images for {dataset} split '{split}' (source: {source})")
            _drop_samples(tmp_path, kept, num_workers=num_workers, chunk_size=chunk_size, page_size=page_size)
            samples = [samples[i] for i in kept]
        labels = np.array([label for _, label in samples])
        return {
            "format": MANIFEST_FORMAT,
            "beton": os.path.basename(write_path),
            "dataset": dataset,
            "split": split,
            "num_samples": len(samples),
            "class_names": list(class_names),
            "per_class_counts": {name: int((labels == i).sum()) for i, name in enumerate(class_names)},
            "num_unlabeled": int((labels == -1).sum()),
            "fields": {"image": "RGBImageField", "label": "IntField"},
            "storage": {"short_side": short_side, "max_side": max_side, "resize": IMAGE_RESIZE,
                        "enlarge": False, "write_mode": write_mode, "jpeg_quality": jpeg_quality,
                        "compress_probability": compress_probability},
            "source": os.fspath(source),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "num_bad_images": len(bad_images),
            "bad_images": [os.fspath(p) for p, _ in bad_images],
            "num_ignored_files": len(ignored_files),
            "ignored_files": [os.fspath(p) for p in ignored_files],
        }

    return _write_atomically(write_path, fields, data, finish, num_workers=num_workers, chunk_size=chunk_size,
                             page_size=page_size, progress=progress)


# ----------------------------------------------------------------------------------------------
# Combining single betons (write_datasets/multi.py)


def _stored_image_field_class():
    from ffcv.fields import RGBImageField

    class StoredImageField(RGBImageField):
        """RGBImageField whose encode copies already-stored bytes (mode, width, height, payload):
        combining betons then costs no decode/re-encode and loses nothing."""

        def encode(self, destination, stored, malloc):
            mode, width, height, payload = stored
            destination["mode"], destination["width"], destination["height"] = mode, width, height
            destination["data_ptr"], storage = malloc(payload.nbytes)
            storage[:] = payload

    return StoredImageField


class _MemberDataset:
    """(stored image, label, dataset_idx) for every sample of the member betons, in order."""

    def __init__(self, beton_paths):
        from ffcv.reader import Reader

        self.beton_paths = list(beton_paths)
        self.images, self.labels, self.sizes, self.offsets = [], [], [], [0]
        for path in self.beton_paths:
            reader = Reader(path)
            if reader.field_names[:2] != ["image", "label"]:
                raise UserError(f"{path} has fields {reader.field_names}, expected image, label")
            images = np.array(reader.metadata["f0"])  # (mode, width, height, data_ptr) per sample
            table = np.sort(reader.alloc_table, order="ptr")
            where = np.searchsorted(table["ptr"], images["data_ptr"])
            if not np.array_equal(table["ptr"][np.minimum(where, len(table) - 1)], images["data_ptr"]):
                raise UserError(f"{path} is damaged: image pointers missing from its allocation table")
            self.images.append(images)
            self.labels.append(np.array(reader.metadata["f1"]))
            self.sizes.append(np.array(table["size"][where]))
            self.offsets.append(self.offsets[-1] + len(images))
        self._files = None  # memmaps, opened lazily in each writer process

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, index):
        if self._files is None:
            self._files = [np.memmap(p, dtype=np.uint8, mode="r") for p in self.beton_paths]
        member = int(np.searchsorted(self.offsets, index, side="right")) - 1
        i = index - self.offsets[member]
        meta = self.images[member][i]
        start = int(meta["data_ptr"])
        payload = np.array(self._files[member][start:start + int(self.sizes[member][i])])
        stored = (meta["mode"], meta["width"], meta["height"], payload)
        return stored, int(self.labels[member][i]), member


def _mark_as_rgb_image_field(beton_path, field_index):
    # DatasetWriter records a field's type id by exact class (ffcv/writer.py, `type(field)`), so our
    # subclass is written as "custom" (255) and readers would demand a handler. Its bytes are a
    # plain RGBImageField's, so we set the id readers expect (ffcv.types.TYPE_ID_HANDLER: 2).
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType, HeaderType
    from ffcv.fields import RGBImageField

    rgb_type_id = {v: k for k, v in TYPE_ID_HANDLER.items()}[RGBImageField]
    header = _read_header(beton_path)
    descriptors = np.memmap(beton_path, dtype=FieldDescType, mode="r+", offset=HeaderType.itemsize,
                            shape=(int(header["num_fields"]),))
    descriptors["type_id"][field_index] = rgb_type_id
    descriptors.flush()
    del descriptors


class _KeptSamples:
    """(stored image, label) of the samples at `kept` of one beton."""

    def __init__(self, beton_path, kept):
        self.members, self.kept = _MemberDataset([beton_path]), kept

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, index):
        stored, label, _ = self.members[self.kept[index]]
        return stored, label


def _drop_samples(beton_path, kept, *, num_workers, chunk_size, page_size):
    """Rewrite the single beton at beton_path keeping only the samples at indices `kept` (in order);
    the stored image bytes are copied, not decoded again."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    compact_path = beton_path + ".compact"
    try:
        writer = DatasetWriter(compact_path, {"image": _stored_image_field_class()(), "label": IntField()},
                               page_size=page_size, num_workers=num_workers)
        with _ffcv_progress("", False):
            writer.from_indexed_dataset(_KeptSamples(beton_path, kept), chunksize=chunk_size)
        _mark_as_rgb_image_field(compact_path, 0)
        os.replace(compact_path, beton_path)
    finally:
        with suppress(FileNotFoundError):
            os.remove(compact_path)


def parse_members(text):
    """`name=path,name=path` -> [(name, path)] in order; UserError on malformed or repeated names."""
    members = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"member '{item}' must look like name=path.beton")
        if name in [n for n, _ in members]:
            raise UserError(f"member name '{name}' appears twice")
        members.append((name, path))
    if not members:
        raise UserError("no members given: use --cfg.members=name=a.beton,name=b.beton")
    return members


def combine_betons(members, write_path, *, split="train", num_workers=1, chunk_size=1000, progress=True):
    """Concatenate single betons into one with fields image, label, dataset_idx; return the manifest.

    members: [(name, beton_path)] in order; dataset_idx = member position, and member d occupies the
    contiguous index range [index_start, index_end). Stored image bytes are copied, not re-encoded.
    """
    from ffcv.fields import IntField

    write_path = os.fspath(write_path)
    manifests = [read_manifest(path) for _, path in members]
    data = _MemberDataset([path for _, path in members])
    needed = sum(os.path.getsize(p) for _, p in members) + 64 * 2**20
    os.makedirs(os.path.dirname(os.path.abspath(write_path)), exist_ok=True)
    check_free_space(write_path, needed)
    fields = {"image": _stored_image_field_class()(), "label": IntField(), "dataset_idx": IntField()}
    page_size = max(int(_read_header(p)["page_size"]) for _, p in members)

    def finish(tmp_path):
        _mark_as_rgb_image_field(tmp_path, 0)
        member_entries = [{
            "name": name, "index_start": data.offsets[d], "index_end": data.offsets[d + 1],
            "num_samples": data.offsets[d + 1] - data.offsets[d], "source": os.path.abspath(path),
            "source_checksum": m["checksum"], "dataset": m["dataset"], "split": m["split"],
            "class_names": m["class_names"], "per_class_counts": m["per_class_counts"],
            "num_unlabeled": m["num_unlabeled"],
            # Manifests written before the storage policy was recorded hold "writer" (longest side capped
            # at max_resolution) instead.
            "storage": m.get("storage", m.get("writer")),
        } for d, ((name, path), m) in enumerate(zip(members, manifests))]
        return {
            "format": MANIFEST_FORMAT,
            "beton": os.path.basename(write_path),
            "dataset": "multi",
            "split": split,
            "num_samples": len(data),
            "class_names": [],  # labels are per member: see members[d].class_names
            "members": member_entries,
            "fields": {"image": "RGBImageField", "label": "IntField", "dataset_idx": "IntField"},
            "source": ",".join(f"{n}={os.path.abspath(p)}" for n, p in members),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "num_bad_images": 0,
            "bad_images": [],
        }

    return _write_atomically(write_path, fields, data, finish, num_workers=num_workers, chunk_size=chunk_size,
                             page_size=page_size, progress=progress)
