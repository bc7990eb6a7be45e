"""bench/device_check.sh --smoke: the GPU check's every section runs on the CPU at toy sizes, so the
script cannot rot between GPU visits. One real subprocess, shared by the tests below."""
import json
import os
import subprocess

import pytest
import torch

from hjepa.copy_race import batch_checksum

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "bench", "device_check.sh")
SECTIONS = ("data", "loader", "copy_race", "train_vit_small", "profile", "short_run", "variants", "train_vit_base")


def run_check(tmp_path, *args):
    out = tmp_path / "device_check.json"
    proc = subprocess.run(["bash", SCRIPT, "--smoke", "--device", "cpu", "--out", str(out),
                           "--work-dir", str(tmp_path / "work"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    results = json.loads(out.read_text()) if out.exists() else None
    return proc, results


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    proc, results = run_check(tmp_path_factory.mktemp("device_check"))
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, results


def test_smoke_run_passes_every_section_and_prints_the_table(smoke):
    proc, results = smoke
    failed = {name: entry.get("error") for name, entry in results["sections"].items() if entry["status"] != "ok"}
    assert failed == {}, proc.stderr[-3000:]
    assert list(results["sections"]) == list(SECTIONS)
    assert proc.returncode == 0
    assert "copy race: batches whose checksums differ" in proc.stdout
    assert results["meta"]["finished"] and results["targets"]["vit_small_img_s"] == 6000


def test_data_section_writes_a_beton_of_the_drawn_images(smoke):
    data = smoke[1]["sections"]["data"]
    assert data["num_images"] == 64 and os.path.isfile(data["beton"])


def test_loader_section_measures_both_paths(smoke):
    loader = smoke[1]["sections"]["loader"]
    assert loader["uint8_img_s"] > 0 and loader["to_device_normalised_img_s"] > 0
    assert loader["batch_size"] == 8


def test_copy_race_finds_host_and_device_checksums_equal_on_every_batch(smoke):
    race = smoke[1]["sections"]["copy_race"]
    assert race["steps"] == 12 and race["mismatched_batches"] == 0 and race["passed"] is True
    assert race["direct_copy_control"]["steps"] == 4  # on the CPU the direct copy is synchronous: no race


def test_batch_checksum_sees_one_changed_byte_and_swapped_rows_and_ignores_memory_layout():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = batch_checksum(images)
    one_byte = images.clone()
    one_byte[1, 2, 5, 7] ^= 1
    rows_swapped = images.clone()
    rows_swapped[2, :, [0, 1]] = images[2, :, [1, 0]]
    assert (batch_checksum(one_byte) != reference).tolist() == [False, True, False]
    assert (batch_checksum(rows_swapped) != reference).tolist() == [False, False, True]
    assert torch.equal(batch_checksum(images.contiguous(memory_format=torch.channels_last)), reference)


@pytest.mark.parametrize("section", ["train_vit_small", "train_vit_base"])
def test_training_sections_time_both_windows_and_count_compiled_graphs(smoke, section):
    train = smoke[1]["sections"][section]
    for window in ("device_batch", "loader_fed"):
        assert train[window]["img_s"] > 0
        assert 0.0 <= train[window]["data_wait_fraction"] < 1.0
    # The masks' shapes are fixed per masking config: every graph compiles in the first step, none later.
    assert train["graphs_compiled_in_warmup"] >= 1 and train["new_graph_steps"] == [0]
    assert train["recompiles_after_warmup"] == 0 and train["warmup_steps"] == 2
    assert train["train_gflops_per_image"] > 0


def test_short_run_loss_falls_and_target_std_stays_above_the_floor(smoke):
    short = smoke[1]["sections"]["short_run"]
    assert short["steps"] == short["steps_asked"] == 16 and short["all_finite"]
    assert short["loss_end"] < short["loss_start"]
    assert short["target_std_min"] > short["target_std_floor"]
    assert short["recompiles"] == 0  # it runs on the graphs train_vit_small compiled
    assert short["passed"] is True


def test_a_spent_budget_skips_every_section_and_still_writes_the_json(tmp_path):
    proc, results = run_check(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: entry["status"] for name, entry in results["sections"].items()} == dict.fromkeys(SECTIONS, "skipped")


def test_profile_section_splits_the_step_time_into_kinds_of_work(smoke):
    profile = smoke[1]["sections"]["profile"]
    assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0
    shares = [entry["share"] for entry in profile["categories"].values()]
    assert abs(sum(shares) - 1.0) < 0.01 and "matmul" in profile["categories"]
    assert profile["top"] and profile["top"][0]["ms_per_step"] >= profile["top"][-1]["ms_per_step"]


def test_variants_section_times_thread_counts_long_epochs_fresh_buffers_the_other_compile_mode_and_cut_blocks(smoke):
    variants = smoke[1]["sections"]["variants"]
    threads = os.cpu_count()
    assert str(threads) in variants["loader_fed_by_workers"]  # the default, timed again beside the others
    assert all(window["img_s"] > 0 for window in variants["loader_fed_by_workers"].values())
    assert variants["loader_fed_fresh_buffers_each_epoch"]["img_s"] > 0
    assert variants["loader_fed_long_epochs"]["epoch_samples"] == 126_689  # ImageNet-100's train split
    assert variants["loader_fed_long_epochs"]["img_s"] > 0
    graphs = variants["other_compile_mode"]  # cpu_demo.yaml compiles in the default mode
    assert graphs["compile_mode"] == "reduce-overhead" and graphs["applied"] is False  # smoke: eager backend
    assert graphs["recompiles_after_warmup"] == 0 and graphs["device_batch"]["img_s"] > 0
    exact = variants["exact_target_blocks"]  # every block size of the warm-up served by one dynamic graph
    assert "error" not in exact, exact.get("error")
    assert exact["warmup_steps"] == exact["block_sizes"] > 2
    assert exact["graphs_compiled_in_warmup"] == 1 and exact["recompiles_after_warmup"] == 0
    assert exact["device_batch"]["img_s"] > 0


def test_cut_blocks_variant_retries_once_with_mix_order_reductions_off_after_an_error_if_time_allows(monkeypatch):
    import torch._inductor.config as inductor_config

    from bench import device_check, device_variants

    attempts = []  # inductor's mix-order setting at each attempt

    def failing_then_working(run, cfg):
        attempts.append(inductor_config.triton.mix_order_reduction)
        return {"error": "RuntimeError: shape"} if len(attempts) == 1 else {"device_batch": {"img_s": 1.0}}

    monkeypatch.setattr(device_variants, "_time_exact_target_blocks", failing_then_working)

    class Run:  # the budget as BudgetedRun keeps it, the sections' time reserves as the GPU run has them
        budget_s = device_check.parse_args([]).budget_s  # the default --budget-s
        size = {"min_seconds": device_check.MIN_SECONDS}

        def __init__(self, elapsed):
            self.elapsed = lambda: elapsed

    result = device_variants.exact_target_blocks(Run(elapsed=100.0), cfg=None)
    assert attempts == [True, False] and inductor_config.triton.mix_order_reduction is True  # restored
    assert result == {"error": "RuntimeError: shape", "without_mix_order_reduction": {"device_batch": {"img_s": 1.0}}}
    attempts.clear()
    assert device_variants.exact_target_blocks(Run(elapsed=400.0), cfg=None) == {"error": "RuntimeError: shape"}
    assert attempts == [True]  # no time left for a second compile before train_vit_base
