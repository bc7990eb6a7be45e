"""The crop-resize of the loaders: it interpolates when enlarging and averages when shrinking, as
torchvision's resized_crop(antialias=True) does, in the function and through both loaders."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from hjepa import loaders
from hjepa.beton import write_beton
from hjepa.augment import output_conversion, resize_crop, scratch_floats
from hjepa.synthetic import draw_image

# numba's dispatcher finalizer can print a KeyError at teardown (harmless): noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
MAX_MEAN_GREY_LEVELS = 3.0


def photo(height, width, seed=0):
    """(H, W, 3) uint8 photo-like picture: gradients, blotches, grain and an object with sharp edges."""
    return draw_image("star", np.random.default_rng(seed), (width, height))


def ours(image, top, left, height, width, size, *, flip=False, normalize=None, jitter=(1.0, 1.0, 1.0)):
    dtype, scale, shift = output_conversion(normalize)
    out = np.zeros((size, size, 3), dtype)
    scratch = np.zeros(scratch_floats(image.shape[1], size, size), np.float32)
    resize_crop(image, float(top), float(left), float(height), float(width), out, flip, scratch, scale, shift,
                *jitter)  # jitter: (brightness, contrast, saturation) factors
    return out  # (size, size, 3)


def torchvision_resized_crop(image, top, left, height, width, size):
    chw = torch.from_numpy(image).permute(2, 0, 1)  # (3, H, W)
    return TF.resized_crop(chw, top, left, height, width, [size, size], antialias=True).permute(1, 2, 0).numpy()


def mean_abs_difference(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_enlarging_a_cifar_sized_image_interpolates_like_torchvision():
    image = photo(32, 32)
    enlarged = ours(image, 0, 0, 32, 32, 224)
    assert mean_abs_difference(enlarged, torchvision_resized_crop(image, 0, 0, 32, 32, 224)) <= MAX_MEAN_GREY_LEVELS
    nearest = image.repeat(7, axis=0).repeat(7, axis=1)  # what an INTER_AREA enlargement gives
    assert mean_abs_difference(nearest, torchvision_resized_crop(image, 0, 0, 32, 32, 224)) > MAX_MEAN_GREY_LEVELS


def test_enlarging_an_off_centre_crop_matches_torchvision():
    image = photo(96, 96)
    assert mean_abs_difference(ours(image, 10, 4, 70, 80, 224),
                               torchvision_resized_crop(image, 10, 4, 70, 80, 224)) <= MAX_MEAN_GREY_LEVELS


def test_shrinking_matches_torchvision_antialiased_resize():
    image = photo(320, 420)
    assert mean_abs_difference(ours(image, 7, 12, 300, 400, 224),
                               torchvision_resized_crop(image, 7, 12, 300, 400, 224)) <= MAX_MEAN_GREY_LEVELS


def test_shrinking_averages_a_pixel_checkerboard_to_grey():
    checker = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    shrunk = ours(checker, 0, 0, 128, 128, 32)  # point sampling would give black and white
    assert np.abs(shrunk.astype(np.int64) - 128).max() <= 1


def test_flip_writes_the_mirror_image():
    image = photo(60, 80)
    assert np.array_equal(ours(image, 3, 5, 50, 70, 40, flip=True), ours(image, 3, 5, 50, 70, 40)[:, ::-1])


def test_colour_jitter_is_torchvision_brightness_then_contrast_then_saturation():
    image = photo(48, 64)
    bright, contrast, saturation = 0.9, 1.3, 0.6  # a darkening brightness: no clipping before the contrast
    jittered = ours(image, 0, 0, 48, 64, 48, jitter=(bright, contrast, saturation))
    resized = torch.from_numpy(ours(image, 0, 0, 48, 64, 48)).permute(2, 0, 1)  # (3, 48, 48)
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(resized, bright), contrast), saturation)
    # torchvision truncates uint8 images after each step (about -0.5 each), ours rounds once at the end
    assert mean_abs_difference(jittered, expected.permute(1, 2, 0).numpy()) <= 2.0
    assert mean_abs_difference(jittered, resized.permute(1, 2, 0).numpy()) > 10


HALF_GREY_LEVEL = 0.5 / 255 / min(loaders.IMAGENET_STD) + 1e-5  # normalised; uint8 rounds, float32 does not


def test_normalised_output_is_normalize_images_of_the_unrounded_values():
    image = photo(60, 80)
    as_uint8 = torch.from_numpy(ours(image, 0, 0, 60, 80, 40)).permute(2, 0, 1)[None]  # (1, 3, 40, 40)
    as_float = ours(image, 0, 0, 60, 80, 40, normalize=(loaders.IMAGENET_MEAN, loaders.IMAGENET_STD))
    assert as_float.dtype == np.float32
    expected = loaders.normalize_images(as_uint8, "cpu", torch.float32)[0].permute(1, 2, 0).numpy()
    assert np.abs(as_float - expected).max() <= HALF_GREY_LEVEL


@pytest.fixture(scope="module")
def small_image_beton(tmp_path_factory):
    """A beton of 8 copies of one 32x32 picture, stored raw (no JPEG loss to blur the comparison)."""
    path = str(tmp_path_factory.mktemp("small") / "small.beton")
    write_beton([(photo(32, 32), 0)] * 8, path, dataset="small", split="train", class_names=["c"],
                source="test", write_mode="raw", progress=False)
    return path


def test_train_loader_enlarges_small_images_by_interpolation(small_image_beton):
    # Scale (1, 1) of a square image: every drawn crop is the whole image (torchvision's rule too).
    with loaders.build_train_loader(loaders.DataConfig(train_dataset=small_image_beton, batch_size=8, num_workers=1,
                                                 image_size=96, crop_scale=(1.0, 1.0), flip=False)) as loader:
        images = next(loader.epoch(0))[0].permute(0, 2, 3, 1).numpy()  # (8, 96, 96, 3)
    expected = torchvision_resized_crop(photo(32, 32), 0, 0, 32, 32, 96)
    assert all(mean_abs_difference(image, expected) <= MAX_MEAN_GREY_LEVELS for image in images)


def test_eval_loader_enlarges_small_images_by_interpolation(small_image_beton):
    with loaders.build_eval_loader(small_image_beton, batch_size=8, num_workers=1, image_size=96) as loader:
        images = next(loader.epoch(0))[0].permute(0, 2, 3, 1).numpy()  # (8, 96, 96, 3)
    side = int(loaders.EVAL_CROP_RATIO * 32)  # 28: the centre 224/256 of the shorter side
    expected = torchvision_resized_crop(photo(32, 32), (32 - side) // 2, (32 - side) // 2, side, side, 96)
    assert all(mean_abs_difference(image, expected) <= MAX_MEAN_GREY_LEVELS for image in images)


def test_float32_loader_output_is_the_uint8_output_normalised(small_image_beton):
    config = loaders.DataConfig(train_dataset=small_image_beton, batch_size=8, num_workers=1, image_size=48,
                             crop_scale=(0.3, 1.0), flip=True, color_jitter=0.4, seed=3)
    with loaders.build_train_loader(config, output="float32") as loader:
        as_float = next(loader.epoch(1))[0].clone()
    with loaders.build_train_loader(config) as loader:
        as_uint8 = next(loader.epoch(1))[0].clone()
    assert as_float.dtype == torch.float32 and as_float.shape == (8, 3, 48, 48)
    expected = loaders.normalize_images(as_uint8, "cpu", torch.float32)
    assert float((as_float - expected).abs().max()) <= HALF_GREY_LEVEL


def worst_row_difference(a, b):
    """The largest mean absolute difference of any one output row: a wrong strip cannot hide in the mean."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=(1, 2)).max())


@pytest.mark.parametrize("size", [1, 7, 9, 65, 150])  # under a tile, past a tile, a 1-row last strip, 3 strips
def test_every_row_matches_torchvision_at_sizes_that_split_into_strips_and_tiles_unevenly(size):
    image = photo(320, 420)
    resized = ours(image, 7, 12, 300, 400, size)
    reference = torchvision_resized_crop(image, 7, 12, 300, 400, size)
    assert worst_row_difference(resized, reference) <= 2 * MAX_MEAN_GREY_LEVELS
    assert np.array_equal(ours(image, 7, 12, 300, 400, size, flip=True), resized[:, ::-1])


def test_contrast_blends_towards_the_whole_image_grey_across_strips():
    image = photo(320, 420)  # 150 px: the strips must share one mean grey
    contrast = 0.5
    jittered = ours(image, 7, 12, 300, 400, 150, jitter=(1.0, contrast, 1.0))
    resized = torch.from_numpy(ours(image, 7, 12, 300, 400, 150)).permute(2, 0, 1)
    expected = TF.adjust_contrast(resized, contrast).permute(1, 2, 0).numpy()
    assert worst_row_difference(jittered, expected) <= 1.0


def test_thread_scratch_rows_start_at_the_asked_offset_past_a_cache_line_and_hold_their_size():
    from hjepa.augment import ThreadScratch

    for size, dtype, offset in ((1001, np.uint8, 16), (77, np.float32, 0), (64, np.float32, 8)):
        scratch = ThreadScratch(size, dtype, offset=offset)
        starts = [row.ctypes.data for row in scratch.values]
        assert all(start % 64 == offset for start in starts)
        assert scratch.address == starts[0] and scratch.row_bytes >= size * np.dtype(dtype).itemsize
        assert [b - a for a, b in zip(starts, starts[1:])] == [scratch.row_bytes] * (len(starts) - 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        ThreadScratch(10, np.float32, offset=2)
