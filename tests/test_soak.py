"""Issue 8 item 5: the train loader runs many epochs in one process, some abandoned midway, without
growing its memory or leaking FFCV's threads (upstream #345, #393: an abandoned EpochIterator stays alive)."""
import gc
import os
import threading

from hjepa.loaders import DataConfig, build_train_loader


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def thread_counts():
    return threading.active_count(), len(os.listdir("/proc/self/task"))


def test_loader_runs_24_epochs_without_growing_memory_or_threads(tiny_beton):
    with build_train_loader(DataConfig(train_dataset=tiny_beton, batch_size=8, num_workers=2, image_size=32)) as loader:
        for epoch in range(24):
            for batch, (images, _, _) in enumerate(loader.epoch(epoch)):
                images.float().mean()  # touch the pixels, as a consumer would
                if epoch % 3 == 1 and batch == 2:
                    break  # abandoned midway: the loader must stop FFCV's thread
            if epoch == 2:
                gc.collect()
                rss_early, threads_early = resident_bytes(), thread_counts()
        gc.collect()
        rss_late, threads_late = resident_bytes(), thread_counts()
    assert rss_late <= 1.05 * rss_early, (rss_early, rss_late)
    assert threads_late[0] <= threads_early[0] and threads_late[1] <= threads_early[1], (threads_early, threads_late)
