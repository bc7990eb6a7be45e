"""The trainer's bookkeeping objects on their own: the throughput meter and the checkpointer."""
import os

from hjepa.checkpoint import Checkpointer, load_checkpoint
from hjepa.runlog import ThroughputMeter


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_meter_counts_images_and_loader_wait_over_its_window():
    clock = FakeClock()
    meter = ThroughputMeter(images_per_step=64, clock=clock)
    for wait, compute in ((0.5, 1.5), (0.0, 2.0)):  # two steps of 2 s, 0.5 s of it waiting for data
        meter.asking()
        clock.now += wait
        meter.received()
        clock.now += compute
        meter.step_done()
    assert meter.read_and_reset() == (2 * 64 / 4.0, 0.5 / 4.0)
    clock.now += 1.0  # the next window starts at the read
    meter.step_done()
    assert meter.read_and_reset() == (64.0, 0.0)


def test_checkpointer_writes_each_step_once_and_keeps_the_newest_epoch_checkpoints(tmp_path):
    made = []

    def make_state(step, epoch):
        made.append(step)
        return {"step": step, "epoch": epoch}

    saver = Checkpointer(str(tmp_path), make_state, steps_per_epoch=10, every_epochs=1, keep=2, enabled=True)
    for step in (10, 10, 20, 25, 30):
        saver.save(step, step // 10)
    assert made == [10, 20, 25, 30]  # the repeated step 10 is not written again
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint_ep0002.pt", "checkpoint_ep0003.pt"]
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 30


def test_checkpointer_of_a_non_main_rank_writes_nothing(tmp_path):
    saver = Checkpointer(str(tmp_path), lambda step, epoch: {}, steps_per_epoch=10, every_epochs=1, keep=2,
                         enabled=False)
    saver.save(10, 1)
    assert os.listdir(tmp_path) == []
