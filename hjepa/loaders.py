"""FFCV loaders for JEPA training and evaluation: the only module that builds `ffcv.Loader`s.

Batches are `(images, labels, dataset_idx)`: images uint8 (B, 3, H, W) (channels_last memory) on the
CPU, labels and dataset_idx int64 (B,); dataset_idx is all zeros for a single-dataset beton. They are
views into FFCV's rotating buffers, valid until the next batch is requested (see JepaLoader): use them
at once (move to the device, normalise) or clone them. Normalisation runs on the training device, in
the model's dtype (`normalize_images`), after a host-to-device copy that never reads FFCV's buffers
once the batch is handed back (`images_to_device`); or, with output="float32", in the loader's
threads (for a CPU consumer, whose training thread would otherwise do it).

Reproducibility: the sample order is a pure function of (seed, epoch, rank, world size) (hjepa.sampler)
and every random augmentation is a hash of (seed, rank, epoch, batch, position) (hjepa.augment), so the
same epoch gives the same batches in a fresh process, and `set_epoch(epoch, start_batch=k)` resumes
at batch k without decoding batches 0..k-1.
"""
import contextlib
import functools
import os
import queue
import sys
from dataclasses import dataclass

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

from hjepa import sampler
from hjepa.beton import beton_num_samples, manifest_path, read_manifest
from hjepa.errors import UserError
from hjepa.augment import CenterCropResize, SeededRandomResizedCrop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 224 / 256  # centre crop of the seed's eval transform (Resize 256, CenterCrop 224)
TRAIN_CROP_ASPECT = (3 / 4, 4 / 3)  # aspect-ratio range of the random-resized crop, as torchvision's
TRAIN_ORDERS = ("random", "quasi_random", "weighted", "balanced")
OUTPUTS = ("uint8", "float32")


class JepaLoader:
    """An FFCV Loader with explicit epochs, resumable mid-epoch, that never leaks its worker thread.

    `epoch(e, start_batch=k)` iterates epoch e from batch k; plain iteration runs `next_epoch` and
    advances it (`set_epoch(e, start_batch=k)` chooses it). `close()` (or leaving a `with` block, or
    dropping an iterator) stops the background thread: FFCV 1.0.2's EpochIterator otherwise stays alive
    when abandoned (upstream #345, #393).

    A batch is valid until the next one is requested. FFCV's EpochIterator decodes into a ring of
    batches_ahead + 2 output slots and queues at most batches_ahead decoded batches: with one batch in
    the consumer's hands, batches_ahead in the queue and one being decoded, every slot is taken, so the
    thread cannot write into the held batch's slot before the consumer asks for the next batch (and
    this class draws nothing ahead of what its consumer asks for).
    """

    def __init__(self, loader, *, seeded_ops, has_dataset_idx, members=None, epoch_counts=None):
        self.loader = loader
        self.batch_size = loader.batch_size
        self.seeded_ops = seeded_ops
        self.has_dataset_idx = has_dataset_idx
        self.members = members            # [(name, num_samples)] for multi-dataset betons
        self.epoch_counts = epoch_counts  # samples per member per epoch, all ranks (weighted orders)
        self.next_epoch, self.start_batch = 0, 0
        self._output_names = list(loader.graph.leaf_nodes.keys())  # FFCV's output tuple order
        self._iterator = None
        _allocate_once(loader.graph)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.next_epoch, self.start_batch = epoch, start_batch

    def epoch_indices(self, epoch):
        """The sample indices this process reads in `epoch`, in order (what `epoch(epoch)` decodes)."""
        order = np.asarray(self.loader.traversal_order.sample_order(epoch))
        return order[:len(self) * self.batch_size]

    def epoch(self, epoch, start_batch=0):
        """An iterator over epoch `epoch` from batch `start_batch` on (batches before it are not decoded)."""
        self.set_epoch(epoch, start_batch)
        return iter(self)

    def __iter__(self):
        epoch, start_batch = self.next_epoch, self.start_batch
        self.next_epoch, self.start_batch = epoch + 1, 0
        return self._run_epoch(epoch, start_batch)

    def _run_epoch(self, epoch, start_batch):
        self.close()
        order = self.epoch_indices(epoch)[start_batch * self.batch_size:]
        for op in self.seeded_ops:
            op.cell.set(epoch, start_batch)
        # What Loader.__iter__ does, minus its epoch counter and with our slice of the order.
        with _keep_torch_threads():
            Compiler.set_num_threads(self.loader.num_workers)
            self.loader.next_epoch = epoch + 1
            iterator = self._iterator = EpochIterator(self.loader, order)
        try:
            for outputs in iterator:
                yield self._as_triplet(outputs)
        finally:
            _stop_epoch_iterator(iterator)
            if self._iterator is iterator:
                self._iterator = None

    def _as_triplet(self, outputs):
        named = dict(zip(self._output_names, outputs))
        labels = named["label"]
        dataset_idx = named["dataset_idx"] if self.has_dataset_idx else torch.zeros_like(labels)
        return named["image"], labels, dataset_idx  # (B, 3, H, W) uint8, (B,) int64, (B,) int64

    def close(self):
        if self._iterator is not None:
            _stop_epoch_iterator(self._iterator)
            self._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _allocate_once(graph):
    """Make FFCV allocate a loader's batch buffers once, not at the start of every epoch.

    FFCV 1.0.2's EpochIterator asks `graph.allocate_memory` for fresh output buffers (batches_ahead + 2
    batches of every operation's output) each epoch and, when CUDA is available, pins them: for batch
    256 at 224 px, ~190 MB of new pinned memory per epoch whose cudaHostAlloc stalls the loader, and on
    the CPU a page fault per 4 kB on the first write of each slot. Reusing them is safe under this
    module's contract: an epoch starts when the consumer asks for its first batch, which hands the
    previous batch back; images_to_device never leaves a copy pending on FFCV's memory.
    """
    allocate, buffers = graph.allocate_memory, {}

    def allocate_memory(batch_size, batches_ahead):
        key = (batch_size, batches_ahead)
        if key not in buffers:
            buffers[key] = allocate(batch_size, batches_ahead)
        return buffers[key]

    graph.allocate_memory = allocate_memory


@contextlib.contextmanager
def _keep_torch_threads():
    """FFCV's Compiler.set_num_threads sets torch's intra-op threads along with numba's (and importing
    ffcv sets them to 1): keep the consumer's torch setting, which matters when it trains on the CPU."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stop_epoch_iterator(iterator):
    """Stop an FFCV EpochIterator thread after at most the batch it is decoding.

    Its loop only checks `terminate_event` when the output queue is full, and at the end of the
    order it blocks on `put(None)` without a timeout. So: give it no further batches, then drain the
    queue until the thread has ended.
    """
    iterator.iter_ixes = iter(())
    iterator.terminate_event.set()
    while iterator.is_alive():
        try:
            iterator.output_queue.get(timeout=0.05)
        except queue.Empty:
            pass
    iterator.join()
    iterator.close()


def _inspect_beton(path):
    """Field names and sample count of the beton at `path`; UserError if it is missing, not a beton with
    image and label, cut short, or disagrees with its manifest. A beton without a manifest is read
    after a one-line warning."""
    path = os.fspath(path)
    if not path:
        raise UserError("no beton path given (data.train_dataset / data.val_dataset)")
    if not os.path.isfile(path):
        raise UserError(f"beton not found: {path} (write it with write_datasets/*.py)")
    num_samples = beton_num_samples(path)  # UserError if the header is not a beton's
    if os.path.isfile(manifest_path(path)):
        read_manifest(path)  # UserError if size or sample count disagree with what the writer recorded
    else:  # e.g. a beton written by FFCV elsewhere: readable, but nothing to check it against
        print(f"warning: {path} has no manifest ({manifest_path(path)}); its size and sample count "
              f"go unchecked", file=sys.stderr)
    try:
        reader = Reader(path)  # a cut inside the data region fails here with an obscure ValueError
    except ValueError as e:
        raise UserError(f"{path} is truncated or damaged ({e}); rewrite it with write_datasets/*.py") from None
    fields = list(reader.handlers)
    for needed in ("image", "label"):
        if needed not in fields:
            raise UserError(f"{path} has no '{needed}' field (fields: {', '.join(fields)})")
    _check_allocation_table(reader, path, num_samples)
    return fields, num_samples


def _check_allocation_table(reader, path, num_samples):
    """A beton cut short without a manifest to say so: FFCV keeps its allocation table at the end of
    the file, one entry per stored image, and a cut there leaves the Reader working with entries missing."""
    from ffcv.types import ALLOC_TABLE_TYPE

    table_bytes = os.path.getsize(path) - int(reader.header["alloc_table_ptr"])
    if table_bytes % ALLOC_TABLE_TYPE.itemsize or len(np.unique(reader.alloc_table["sample_id"])) < num_samples:
        raise UserError(f"{path} is truncated: its allocation table lacks entries for some of its "
                        f"{num_samples} images; rewrite it with write_datasets/*.py")


def _members(path, num_samples):
    """[(name, num_samples)] of a beton from its manifest; one member for a single-dataset beton."""
    manifest = read_manifest(path)
    if "members" not in manifest:
        return [(manifest["dataset"], num_samples)]
    members, start = [], 0
    for m in manifest["members"]:
        if m["index_start"] != start or m["index_end"] - m["index_start"] != m["num_samples"]:
            raise UserError(f"manifest of {path}: member '{m['name']}' does not continue the index range "
                            f"at {start}; rewrite it with write_datasets/multi.py")
        members.append((m["name"], m["num_samples"]))
        start = m["index_end"]
    if start != num_samples:
        raise UserError(f"manifest of {path}: members hold {start} samples, the beton {num_samples}")
    return members


def _rank_and_world(distributed):
    if not distributed:
        return 0, 1
    if not torch.distributed.is_initialized():
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _label_pipeline():
    return [IntDecoder(), ToTensor(), Squeeze(1)]  # (B, 1) -> (B,), also when B == 1


def _usable_threads(num_workers):
    """FFCV threads, capped at numba's pool size (the core count): numba raises for more, so a
    config written for a 16-core GPU box (data.num_workers=12) still runs on a laptop."""
    import numba

    return max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))


@dataclass(frozen=True)
class DataConfig:
    """The data section: the train loader's settings (val_dataset feeds the trainer's k-NN monitor)."""
    train_dataset: str = ""            # .beton path
    val_dataset: str = ""
    image_size: int = 224              # crop side in pixels fed to the model
    crop_scale: tuple = (0.8, 1.0)     # random-resized-crop area fraction range
    flip: bool = True
    color_jitter: float = 0.0          # brightness/contrast/saturation strength, 0 disables
    batch_size: int = 256              # per process
    num_workers: int = 8               # FFCV threads
    in_memory: bool = True             # FFCV os_cache
    order: str = "random"              # random | quasi_random | weighted | balanced
    seed: int = 0                      # of the sample order and augmentations
    mixture: str = ""                  # 'name:weight,...' for order=weighted
    epoch_samples: int = -1            # -1 = the beton's size

    def __post_init__(self):
        object.__setattr__(self, "crop_scale", tuple(float(s) for s in self.crop_scale))


def build_train_loader(config, *, distributed=False, drop_last=True, output="uint8"):
    """The JEPA train loader of DataConfig `config`: seeded random-resized crop (ratio 3/4..4/3), flip,
    optional colour jitter.

    output: "uint8" images, or "float32" normalised by the loader's threads (`_image_output`).

    order: random | quasi_random | weighted (by `mixture`, 'name:weight,...') | balanced (equal
    weights over the members). random/weighted/balanced cover exactly floor(E / (world*B)) batches
    per rank and epoch (E = epoch_samples, -1 = the beton's size); see hjepa.sampler.
    """
    path, batch_size, num_workers, seed = config.train_dataset, config.batch_size, config.num_workers, config.seed
    order, mixture, epoch_samples = config.order, config.mixture or None, config.epoch_samples
    fields, num_samples = _inspect_beton(path)
    if order not in TRAIN_ORDERS:
        raise UserError(f"data.order={order!r} is not one of {'|'.join(TRAIN_ORDERS)}")
    if mixture and order != "weighted":
        raise UserError(f"data.mixture is set but data.order={order}; use data.order=weighted")
    if order == "quasi_random" and (distributed or epoch_samples != -1):
        raise UserError("data.order=quasi_random works only without hardware.distributed and data.epoch_samples")
    rank, world_size = _rank_and_world(distributed)
    members, epoch_counts = None, None
    if order in ("weighted", "balanced"):
        members = _members(path, num_samples)
        names, sizes = [n for n, _ in members], [s for _, s in members]
        if order == "weighted":
            if not mixture:
                raise UserError("data.order=weighted needs data.mixture, e.g. imagenet100:0.6,stl10:0.4")
            weights = list(sampler.parse_mixture(mixture, names).values())
        else:
            weights = [1.0] * len(names)
        indices_for_epoch = lambda epoch: sampler.weighted_epoch_indices(  # noqa: E731
            sizes, weights, epoch_samples=epoch_samples, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, batch_size=batch_size)
        epoch_counts = sampler.expected_counts(sizes, weights, epoch_samples=epoch_samples,
                                               world_size=world_size, batch_size=batch_size)
        total = int(epoch_counts.sum())
    elif order == "random":
        indices_for_epoch = lambda epoch: sampler.random_epoch_indices(  # noqa: E731
            num_samples, epoch_samples=epoch_samples, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, batch_size=batch_size)
        total = sampler.effective_epoch_samples([num_samples], epoch_samples=epoch_samples,
                                                world_size=world_size, batch_size=batch_size)
    else:
        total = (num_samples // batch_size) * batch_size if drop_last else num_samples
    if total == 0:
        raise UserError(f"data.batch_size={batch_size} x {world_size} process(es) is more than the "
                        f"{num_samples if epoch_samples == -1 else epoch_samples} samples per epoch of {path}")

    # Augmentations of different ranks must differ: their seed mixes in the rank.
    op_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
    # One op decodes, crops, resizes, flips, jitters and writes the output dtype (hjepa.augment).
    size = (config.image_size, config.image_size)
    image_ops = [SeededRandomResizedCrop(size, scale=config.crop_scale, ratio=TRAIN_CROP_ASPECT, seed=op_seed,
                                         flip_prob=0.5 if config.flip else 0.0, color_jitter=config.color_jitter,
                                         normalize=_image_output(output))]
    seeded_ops = list(image_ops)
    # Every numba op stays before ToTensor: a pipeline that goes jitted -> torch -> jitted hangs FFCV
    # 1.0.2's Loader constructor (Graph.group_operations, upstream issue #396).
    image_ops += [ToTensor(), ToTorchImage()]

    if order == "quasi_random":
        ffcv_order = OrderOption.QUASI_RANDOM
    else:
        ffcv_order = sampler.register_order(f"{order} {path}", indices_for_epoch)
    try:
        with _keep_torch_threads():
            loader = Loader(os.fspath(path), batch_size=batch_size, num_workers=_usable_threads(num_workers),
                            os_cache=config.in_memory, order=ffcv_order, seed=seed, drop_last=drop_last,
                            pipelines=_pipelines(fields, image_ops))
    finally:
        sampler.unregister_order(ffcv_order)
    return JepaLoader(loader, seeded_ops=seeded_ops, has_dataset_idx="dataset_idx" in fields,
                      members=members, epoch_counts=epoch_counts)


def build_eval_loader(path, *, batch_size, num_workers, image_size, in_memory=True, distributed=False,
                      output="uint8"):
    """The JEPA eval loader: centre crop (224/256 of the short side) resized to image_size, sequential.

    Keeps the last partial batch. distributed=True shards like DistributedSampler(shuffle=False),
    which pads the last rank with repeated samples.
    """
    fields, _ = _inspect_beton(path)
    _rank_and_world(distributed)
    image_ops = [CenterCropResize((image_size, image_size), ratio=EVAL_CROP_RATIO, normalize=_image_output(output)),
                 ToTensor(), ToTorchImage()]
    with _keep_torch_threads():
        loader = Loader(os.fspath(path), batch_size=batch_size, num_workers=_usable_threads(num_workers),
                        os_cache=in_memory, order=OrderOption.SEQUENTIAL, distributed=distributed,
                        drop_last=False, pipelines=_pipelines(fields, image_ops))
    return JepaLoader(loader, seeded_ops=[], has_dataset_idx="dataset_idx" in fields)


def _image_output(output):
    """The ops' normalize argument for a loader output: None (uint8 out) or (mean, std) (float32 out).

    float32 moves the normalisation into the loader's threads, for consumers that train on the CPU:
    there it would otherwise run on the training thread. A GPU consumer wants uint8 (a quarter of
    the bytes to copy) and normalises on the device (`normalize_images`)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return None if output == "uint8" else (IMAGENET_MEAN, IMAGENET_STD)


def _pipelines(fields, image_ops):
    """Fresh op instances for every Loader: FFCV 1.0.2 ops must not be shared between Loaders (a second
    Loader built with the same decoder instance returned uncropped images of the wrong shape)."""
    pipelines = {name: None for name in fields}  # fields we do not read are not decoded
    pipelines["image"] = image_ops
    pipelines["label"] = _label_pipeline()
    if "dataset_idx" in fields:
        pipelines["dataset_idx"] = _label_pipeline()
    return pipelines


@functools.lru_cache(maxsize=None)
def _normalisation_constants(device):
    """(scale, shift), each (1, 3, 1, 1) float32 on `device`, with x * scale + shift = (x/255 - mean)/std.
    Made once per device: building them each step would be two small host->device copies per step."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (1.0 / (255 * std)).to(device), (-mean / std).to(device)


def staging_copy(images, *, pin):
    """A copy of `images` in memory torch owns (pinned when `pin`), with the same strides: channels_last
    stays channels_last, so both this copy and the device copy after it are single memcpys."""
    return torch.empty_like(images, pin_memory=pin).copy_(images)


def images_to_device(images, device):
    """A CPU batch on `device`, copied without a device sync and safe against FFCV reusing its buffer.

    FFCV hands out views of output buffers that it pins when CUDA is available
    (ffcv/pipeline/allocation_query.py) and that its thread overwrites once the next batch has been
    requested. A non_blocking copy straight from such a view runs when the stream gets to it; with the
    host steps ahead of the GPU that can be after FFCV wrote another batch there: a silently wrong
    batch. (`pin_memory()` does not help: on an already pinned view it returns the same memory.) So on
    CUDA the batch is first copied on the host into a block of torch's caching host allocator, which
    records an event with the asynchronous copy and does not hand the block out again before that
    event has passed: one host memcpy per batch, no device sync. (Pinned, because a copy from pageable
    memory makes CUDA drain the stream first: a hidden sync each step.) Other devices copy synchronously
    (on the CPU, `.to` returns the view itself: the caller's next operation must copy it).
    """
    device = torch.device(device)
    if device.type == "cuda" and images.device.type == "cpu":
        return staging_copy(images, pin=True).to(device, non_blocking=True)
    return images.to(device)


def normalize_images(images, device, dtype, out=None):
    """uint8 (B, 3, H, W) -> (images/255 - ImageNet mean) / std as `dtype` on `device`.

    Arithmetic in float32 on the device (cheap there, and a quarter of the host->device bytes),
    then one cast to the model's dtype. `out` (float32, same shape, on `device`) is reused when
    given: on a CPU consumer a fresh 38 MB batch per step costs its page faults every time, which
    CUDA's caching allocator avoids by itself (measured: 33 -> 18 ms per 64x3x224x224 batch, 1 thread).
    When it returns, `images` may be handed back to the loader (see images_to_device).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images takes uint8 images, got {images.dtype}")
    device = torch.device(device)
    scale, shift = _normalisation_constants(device)
    images = images_to_device(images, device)
    if out is not None and out.shape == images.shape:
        x = out.copy_(images)
    else:
        x = images.float()
    x.mul_(scale).add_(shift)  # in place: (x - mean) / std with x in [0, 255]  # (B, 3, H, W)
    return x.to(dtype)
