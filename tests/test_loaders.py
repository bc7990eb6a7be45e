"""FFCV train/eval loaders (hjepa.loaders) on small betons the tests write themselves."""
import hashlib
import os
import subprocess
import sys
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from hjepa import loaders
from hjepa.beton import write_beton
from hjepa.errors import UserError
from hjepa.sampler import expected_counts, weighted_epoch_indices

# numba's dispatcher finalizer can print a KeyError at interpreter teardown: harmless noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, BATCH = 32, 8


def gradient_image():
    """64x48 image whose red channel rises left to right: any crop keeps the slope, a flip reverses it."""
    x = np.linspace(0, 255, 64)[None, :].repeat(48, axis=0)
    y = np.linspace(0, 255, 48)[:, None].repeat(64, axis=1)
    return np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)  # (48, 64, 3)


@pytest.fixture(scope="module")
def gradient_beton(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gradient") / "gradient.beton")
    write_beton([(gradient_image(), 0)] * 32, path, dataset="gradient", split="train", class_names=["g"],
                source="test", write_mode="raw", progress=False)
    return path


def train_loader(path, **overrides):
    kwargs = dict(batch_size=BATCH, num_workers=2, image_size=SIZE, crop_scale=(0.3, 1.0), flip=True,
                  color_jitter=0.1, seed=0)
    kwargs.update(overrides)
    distributed = kwargs.pop("distributed", False)
    return loaders.build_train_loader(loaders.DataConfig(train_dataset=path, **kwargs), distributed=distributed)


@pytest.fixture(scope="module")
def gradient_loaders(gradient_beton):
    """Two loaders with the same seed, 2 threads and 1 (single-threaded numba compiles faster)."""
    with train_loader(gradient_beton) as first, train_loader(gradient_beton, num_workers=1) as second:
        yield first, second


@pytest.fixture(scope="module")
def eval_loader(tiny_beton):
    with loaders.build_eval_loader(tiny_beton, batch_size=10, num_workers=1, image_size=SIZE) as loader:
        yield loader


@pytest.fixture(scope="module")
def weighted_rank1_loader(tiny_multi_beton):
    """Rank 1 of a world of 2, order weighted: what a second GPU process would read."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loaders, "_rank_and_world", lambda distributed: (1, 2))
        loader = train_loader(tiny_multi_beton, order="weighted", mixture="big:0.5,mid:0.2,small:0.3",
                              batch_size=4, num_workers=1, distributed=True)
    with loader:
        yield loader


def epoch_batches(loader, epoch, start_batch=0):
    return [tuple(t.clone() for t in batch) for batch in loader.epoch(epoch, start_batch=start_batch)]


def red_slope(images):
    """(B,) sign of the red channel's left-to-right slope: +1 unflipped, -1 flipped."""
    red = images[:, 0].float()  # (B, H, W)
    return torch.sign(red[:, :, -1].mean(1) - red[:, :, 0].mean(1))


def test_train_batches_are_uint8_nchw_with_int64_labels(gradient_loaders):
    images, labels, dataset_idx = epoch_batches(gradient_loaders[0], 0)[0]
    assert images.shape == (BATCH, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.shape == dataset_idx.shape == (BATCH,)
    assert labels.dtype == dataset_idx.dtype == torch.int64
    assert not dataset_idx.any()  # single-dataset beton


def test_len_is_full_batches_per_epoch(gradient_loaders):
    assert len(gradient_loaders[0]) == 32 // BATCH == len(epoch_batches(gradient_loaders[0], 0))


def test_flips_happen_on_about_half_the_images(gradient_loaders):
    slopes = torch.cat([red_slope(images) for images, _, _ in epoch_batches(gradient_loaders[0], 0)])
    assert 0 < int((slopes < 0).sum()) < 32


def test_crops_vary_between_copies_of_one_image(gradient_loaders):
    images = torch.cat([b[0] for b in epoch_batches(gradient_loaders[0], 0)])
    unflipped = torch.where(red_slope(images)[:, None, None, None] < 0, images.flip(-1), images)
    left_red = unflipped[:, 0, :, 0].float().mean(1)  # where the crop starts in x
    assert len(torch.unique(left_red)) > 8


def test_same_seed_and_epoch_give_identical_batches_with_any_thread_count(gradient_loaders):
    first, second = gradient_loaders
    batches_a, batches_b = epoch_batches(first, 3), epoch_batches(second, 3)
    assert len(batches_a) == len(batches_b) > 0
    for a, b in zip(batches_a, batches_b):
        assert torch.equal(a[0], b[0])


def test_different_epochs_give_different_augmentations(gradient_loaders):
    a, b = epoch_batches(gradient_loaders[0], 0), epoch_batches(gradient_loaders[0], 1)
    assert not torch.equal(a[0][0], b[0][0])


def test_epoch_can_start_at_a_later_batch(gradient_loaders):
    full = epoch_batches(gradient_loaders[0], 2)
    resumed = epoch_batches(gradient_loaders[0], 2, start_batch=2)
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed))


def test_abandoned_epoch_leaves_no_thread(gradient_loaders):
    before = threading.active_count()
    for _ in gradient_loaders[0].epoch(0):
        break
    assert threading.active_count() == before


def test_same_batches_in_a_fresh_process(gradient_loaders, gradient_beton):
    script = ("import sys, hashlib; from hjepa.loaders import DataConfig, build_train_loader\n"
              f"loader = build_train_loader(DataConfig(train_dataset=sys.argv[1], batch_size={BATCH}, num_workers=1, "
              f"image_size={SIZE}, crop_scale=(0.3, 1.0), flip=True, color_jitter=0.1, seed=0))\n"
              "print(hashlib.sha1(b''.join(b[0].contiguous().numpy().tobytes() for b in loader.epoch(4)))"
              ".hexdigest())\n")
    done = subprocess.run([sys.executable, "-c", script, gradient_beton], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    here = hashlib.sha1(b"".join(b[0].contiguous().numpy().tobytes() for b in epoch_batches(gradient_loaders[0], 4)))
    assert done.stdout.split()[-1] == here.hexdigest()


def test_eval_batches_are_identical_across_passes_and_keep_the_tail(eval_loader):
    first, second = epoch_batches(eval_loader, 0), epoch_batches(eval_loader, 1)
    assert [b[0].shape[0] for b in first] == [10] * 6 + [4]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    labels = torch.cat([b[1] for b in first])
    assert labels.tolist() == [c for c in range(4) for _ in range(16)]  # sequential order


def test_weighted_loader_reads_its_rank_shard_with_exact_member_counts(weighted_rank1_loader):
    sizes, weights = [48, 24, 12], [0.5, 0.2, 0.3]
    shard = weighted_epoch_indices(sizes, weights, seed=0, epoch=1, rank=1, world_size=2, batch_size=4)
    assert np.array_equal(weighted_rank1_loader.loader.traversal_order.sample_order(1), shard)
    dataset_idx = torch.cat([b[2] for b in epoch_batches(weighted_rank1_loader, 1)])
    expected = np.bincount(np.searchsorted([48, 72, 84], shard, side="right"), minlength=3)
    assert torch.bincount(dataset_idx, minlength=3).tolist() == expected.tolist()
    other = weighted_epoch_indices(sizes, weights, seed=0, epoch=1, rank=0, world_size=2, batch_size=4)
    both = np.bincount(np.searchsorted([48, 72, 84], np.concatenate([shard, other]), side="right"))
    assert both.tolist() == weighted_rank1_loader.epoch_counts.tolist() == \
        expected_counts(sizes, weights, world_size=2, batch_size=4).tolist()


def wait_until_loader_is_ahead(loader, timeout=10.0):
    """Until FFCV's thread has filled its queue (or ended the epoch), then a moment for the batch it is
    decoding: the farthest ahead it can get while the consumer holds a batch."""
    iterator, deadline = loader._iterator, time.monotonic() + timeout
    while iterator.is_alive() and not iterator.output_queue.full() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)


def test_a_held_batch_stays_intact_until_the_next_is_requested(eval_loader):
    # 7 batches through FFCV's 5 output slots: every slot is reused while the epoch runs.
    for index, (images, labels, _) in enumerate(eval_loader.epoch(0)):
        kept_images, kept_labels = images.clone(), labels.clone()
        wait_until_loader_is_ahead(eval_loader)
        assert torch.equal(images, kept_images) and torch.equal(labels, kept_labels), f"batch {index} overwritten"


def test_staged_copy_keeps_its_batch_after_the_loader_reuses_the_buffer(eval_loader):
    batches = eval_loader.epoch(0)
    images, _, _ = next(batches)
    staged = loaders.staging_copy(images, pin=False)  # what images_to_device copies from on CUDA (pinned there)
    assert staged.untyped_storage().data_ptr() != images.untyped_storage().data_ptr()
    assert staged.stride() == images.stride()  # channels_last kept: the device copy stays one memcpy
    first = images.clone()
    for _ in batches:  # batch 5 goes into batch 0's slot
        pass
    assert not torch.equal(images, first)  # FFCV did reuse the memory the batch was handed out in
    assert torch.equal(staged, first)


def test_batch_buffers_are_allocated_once_not_every_epoch(eval_loader):
    # FFCV would allocate (and on CUDA pin) batches_ahead + 2 fresh batches at every epoch's start.
    buffers = []
    for epoch in range(3):
        batches = eval_loader.epoch(epoch)
        next(batches)
        buffers.append(eval_loader._iterator.memory_allocations)  # kept alive: no address reuse by chance
    assert buffers[0] is buffers[1] is buffers[2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_batches(eval_loader, 0), epoch_batches(eval_loader, 1)))


def test_beton_without_manifest_is_read_after_a_one_line_warning(tiny_beton, tmp_path, capsys):
    copy = str(tmp_path / "elsewhere.beton")  # as if written by FFCV's own writer: no manifest beside it
    shutil.copyfile(tiny_beton, copy)
    assert loaders._inspect_beton(copy) == (["image", "label"], 64)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and copy in lines[0] and "manifest" in lines[0]


def test_beton_with_its_manifest_is_read_silently(tiny_beton, capsys):
    loaders._inspect_beton(tiny_beton)
    assert capsys.readouterr().err == ""


def test_missing_beton_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        train_loader(str(tmp_path / "nope.beton"))


def test_file_that_is_not_a_beton_is_a_user_error(tmp_path):
    path = tmp_path / "fake.beton"
    path.write_bytes(b"not a beton at all" * 10)
    with pytest.raises(UserError, match="not a .beton"):
        loaders.build_eval_loader(str(path), batch_size=4, num_workers=1, image_size=SIZE)


def test_batch_larger_than_the_dataset_is_a_user_error(tiny_beton):
    with pytest.raises(UserError, match="batch_size"):
        train_loader(tiny_beton, batch_size=65)


def test_unknown_mixture_member_is_a_user_error(tiny_multi_beton):
    with pytest.raises(UserError, match="zzz"):
        train_loader(tiny_multi_beton, order="weighted", mixture="big:1,zzz:1")


def test_bad_mixture_exits_with_status_1_from_train_cli(tiny_multi_beton, tmp_path):
    # One subprocess (each costs seconds); the other bad strings are covered in test_sampler.py.
    done = subprocess.run(
        [sys.executable, "hjepa/train.py", f"--data.train_dataset={tiny_multi_beton}", "--data.order=weighted",
         "--data.mixture=big:-1,mid:1", f"--logging.folder={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "error:" in done.stderr and "mixture" in done.stderr


def test_normalize_images_gives_imagenet_standardised_floats():
    images = torch.full((2, 3, 4, 4), 124, dtype=torch.uint8)  # 124/255 ~ the red mean 0.485
    x = loaders.normalize_images(images, "cpu", torch.bfloat16)
    assert x.dtype == torch.bfloat16 and x.shape == images.shape
    assert abs(float(x[0, 0].float().mean())) < 0.01
    varied = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = torch.tensor(loaders.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(loaders.IMAGENET_STD).view(1, 3, 1, 1)
    expected = (varied.float() / 255 - mean) / std
    torch.testing.assert_close(loaders.normalize_images(varied, "cpu", torch.float32), expected)
    buffer = torch.empty(2, 3, 5, 5)
    reused = loaders.normalize_images(varied, "cpu", torch.float32, out=buffer)
    torch.testing.assert_close(reused, expected)
    assert reused.data_ptr() == buffer.data_ptr()
