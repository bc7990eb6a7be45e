"""hjepa.step_timing: the timed windows the benchmarks report."""
import time

import torch

from hjepa.step_timing import peak_memory_gib, reset_memory_stats, timed_window


class CountingTrainer:
    device, batch, flops = torch.device("cpu"), 4, 1e9

    def __init__(self):
        self.steps = []

    def step(self, step, images):
        self.steps.append(step)
        return {"loss": torch.tensor(0.5)}


def test_timed_window_runs_the_numbered_steps_and_counts_the_wait_for_images():
    trainer = CountingTrainer()

    def slow_images():
        time.sleep(0.01)
        return None

    window = timed_window(trainer, slow_images, steps=5, first_step=7, peak_tflops=100.0)
    assert trainer.steps == [7, 8, 9, 10, 11]
    assert window["data_wait_fraction"] > 0.5  # the steps cost nothing: the window is mostly waiting
    assert window["img_s"] > 0 and window["loss"] == 0.5
    assert abs(window["mfu"] - window["img_s"] * 1e9 / 100e12) < 1e-4
    assert timed_window(trainer, lambda: None, steps=1, first_step=0)["mfu"] is None  # no peak: no MFU


def test_memory_figures_are_absent_off_cuda():
    cpu = torch.device("cpu")
    assert reset_memory_stats(cpu) == 0 and peak_memory_gib(cpu) is None
