"""The train loader runs many epochs in one process, some abandoned midway, without growing its memory or
leaking FFCV's threads (upstream ffcv #345, #393: an abandoned EpochIterator stays alive)."""
import gc
import os
import threading

import numba

from hjepa.loaders import DataConfig, build_train_loader

# numba's parallel decoding runs on TBB here (numba.threading_layer()). numba starts TBB with its thread count
# and runs each parallel loop in a new task_arena (numba/np/ufunc/tbbpool.cpp); TBB grows its worker pool
# lazily and retires workers on its own schedule: each epoch's FFCV thread is a new TBB caller, and now and
# then one more worker appears (on a 2-core VM: one extra thread, first seen at epoch 6 in one run and 123 in
# another, gone a few epochs later, yet kept for over a minute by an idle process). That pool is bounded; a
# leak grows with the epochs.
NATIVE_POOL_SLACK = numba.config.NUMBA_NUM_THREADS
ABANDONED_EPOCHS = NATIVE_POOL_SLACK + 6  # more than the slack, so a thread leaked per epoch cannot hide in it


def usage():
    """(resident bytes, Python threads, OS threads) of this process, after a garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident, threading.active_count(), len(os.listdir("/proc/self/task"))


def test_loader_runs_many_epochs_without_growing_memory_or_threads(tiny_beton):
    epochs = 3 + 3 * ABANDONED_EPOCHS  # every third epoch from epoch 4 on is abandoned after its third batch
    with build_train_loader(DataConfig(train_dataset=tiny_beton, batch_size=8, num_workers=2, image_size=32)) as loader:
        for epoch in range(epochs):
            for batch, (images, _, _) in enumerate(loader.epoch(epoch)):
                images.float().mean()  # touch the pixels, as a consumer would
                if epoch % 3 == 1 and batch == 2:
                    break  # abandoned midway: the loader must stop FFCV's thread
            if epoch == 2:
                rss_early, python_threads_early, os_threads_early = usage()
        rss_late, python_threads_late, os_threads_late = usage()
    assert rss_late <= 1.05 * rss_early, (rss_early, rss_late)
    assert python_threads_late <= python_threads_early, (python_threads_early, python_threads_late)
    assert os_threads_late <= os_threads_early + NATIVE_POOL_SLACK, (os_threads_early, os_threads_late)
