"""The run folder: params.json, metrics.jsonl, the git commit, and where checkpoints live."""
import json
import os
import platform
import secrets
import subprocess
import time

from hjepa.errors import UserError


def new_run_name():
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def git_commit(repo_dir=None):
    """The commit the code runs at (with '+dirty' when tracked files differ), or 'unknown'."""
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def cpu_model():
    """The CPU's model name, for benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_run_dir(folder, run_name):
    path = os.path.join(folder, run_name)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {path}: {e.strerror}") from None
    return path


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a killed run keeps what it logged."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "a")

    def write(self, record):
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ThroughputMeter:
    """Images/s and the fraction of wall time spent waiting for the loader, over a window of steps."""

    def __init__(self, images_per_step, clock=time.perf_counter):
        self.images_per_step, self.clock = images_per_step, clock
        self.reset()

    def reset(self):
        self.start = self._asked = self.clock()
        self.steps, self.data_wait = 0, 0.0

    def asking(self):
        """Call just before asking the loader for a batch."""
        self._asked = self.clock()

    def received(self):
        """Call as the batch arrives."""
        self.data_wait += self.clock() - self._asked

    def step_done(self):
        self.steps += 1

    def read_and_reset(self):
        """(images per second, data-wait fraction) since the last reset."""
        elapsed = self.clock() - self.start
        figures = self.steps * self.images_per_step / elapsed, min(1.0, self.data_wait / elapsed)
        self.reset()
        return figures
