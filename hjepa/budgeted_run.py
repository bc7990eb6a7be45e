"""A benchmark run made of sections under a time budget, for machines lent in short visits.

A section starts only while the seconds it needs still fit in the budget (else it is recorded as
skipped); one that raises is recorded with its error and the next one runs; the JSON is rewritten
after every figure, so whatever ends the run leaves what was measured; and a watchdog thread writes
the results, marks the running section timed_out and exits 124 at the hard limit.
"""
import json
import os
import threading
import time
import traceback


class BudgetedRun:
    """results = {"meta": {...}, "sections": {name: {"status", "started_at_s", "seconds", figures...}}}
    plus whatever the caller puts beside them; written to `out` (through out + ".partial")."""

    def __init__(self, *, out, budget_s, hard_limit_s, start, results):
        self.out, self.budget_s, self.hard_limit_s, self.start = out, budget_s, hard_limit_s, start
        self.results = results
        self.results.setdefault("meta", {})
        self.results.setdefault("sections", {})
        self.current = None  # the running section
        self.lock = threading.RLock()  # the watchdog thread saves too

    def elapsed(self):
        return time.perf_counter() - self.start

    def out_of_time(self):
        return self.elapsed() > self.budget_s

    def say(self, message):
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def save(self):
        with self.lock:
            self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
            with open(self.out + ".partial", "w") as f:
                json.dump(self.results, f, indent=2, default=str)
            os.replace(self.out + ".partial", self.out)

    def record(self, **figures):
        """Add figures to the running section and rewrite the JSON, so a timeout keeps them."""
        with self.lock:
            self.results["sections"][self.current].update(figures)
            self.save()

    def run(self, name, section, *, needs_s=0.0):
        """section(self), unless fewer than needs_s seconds of the budget are left."""
        self.current = name
        self.results["sections"][name] = entry = {"status": "running", "started_at_s": round(self.elapsed(), 1)}
        left = self.budget_s - self.elapsed()
        if left < needs_s:
            entry.update(status="skipped", reason=f"{left:.0f} s of the budget left, the section needs {needs_s} s")
            self.say(f"skip {name}: {entry['reason']}")
            return self.save()
        self.say(f"--- {name}")
        try:
            section(self)
            entry["status"] = "ok"
        except Exception as e:  # a visit must not be lost to one bug: record it and go on (see passed)
            traceback.print_exc()
            entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = round(self.elapsed() - entry["started_at_s"], 1)
        self.say(f"{name}: {entry['status']} in {entry['seconds']} s")
        self.save()

    def finish(self):
        with self.lock:
            self.current = None
            self.results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.save()

    def passed(self):
        """True when every section ran to the end or was skipped for time."""
        return all(entry["status"] in ("ok", "skipped") for entry in self.results["sections"].values())

    def start_watchdog(self, report=None):
        """At hard_limit_s: mark the running section timed_out, save, call report(results), exit 124."""
        def expire():
            with self.lock:
                if self.current:
                    self.results["sections"][self.current]["status"] = "timed_out"
                self.results["meta"]["timed_out_at_s"] = round(self.elapsed(), 1)
                self.save()
            print(f"hard limit of {self.hard_limit_s:.0f} s reached; partial results in {self.out}", flush=True)
            if report:
                report(self.results)
            os._exit(124)

        timer = threading.Timer(self.hard_limit_s - self.elapsed(), expire)
        timer.daemon = True
        timer.start()
