"""The loader benchmark's measuring parts: paired timed windows and the one-thread breakdown."""
import numpy as np
import pytest

from bench.loader_throughput import one_thread_ms, stored_jpegs, timed_epochs

# numba's dispatcher finalizer can print a KeyError at teardown (harmless): noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_each_timed_window_follows_its_own_before_each_call_after_one_warm_up_epoch():
    events = []

    def batches_of_epoch():
        events.append("epoch")
        yield 4
        yield 3

    rates = timed_epochs(batches_of_epoch, 2, repeats=3, before_each=lambda: events.append("reference"))
    assert len(rates) == 3 and all(rate > 0 for rate in rates)
    assert events == ["epoch"] + ["reference", "epoch", "epoch"] * 3


def test_one_thread_breakdown_times_decode_alone_and_with_the_resize_into_both_outputs(tiny_beton):
    jpegs, jpeg_sizes, all_sizes = stored_jpegs(tiny_beton)
    assert len(jpegs) == len(jpeg_sizes) == len(all_sizes) == 64  # every image of the tiny beton is a JPEG
    assert np.array_equal(jpeg_sizes, all_sizes)
    ms = one_thread_ms(jpegs, jpeg_sizes, image_size=32, crop_scale=(0.3, 1.0), ring=8)
    assert set(ms) == {"decode_ms", "decode_resize_uint8_ms", "decode_resize_float32_ms"}
    assert 0 < ms["decode_ms"] < ms["decode_resize_uint8_ms"]  # the resize adds to the decode
