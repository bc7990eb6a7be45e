"""Linear probe, k-NN, feature cache and the eval/linear_probe.py command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hjepa import probe
from hjepa.checkpoint import save_checkpoint
from hjepa.vit import build_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"arch": "vit_tiny", "patch_size": 8, "image_size": 32}  # 16 tokens: fast on 2 CPU cores


def gaussian_blobs(num_classes, per_class, dim=32, seed=0, spread=1.0):
    """Separable features: one well-separated centre per class plus unit noise."""
    centres = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (N,)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + spread * noise, labels  # (N, D), (N,)


PROBE_KWARGS = dict(epochs=10, lr=0.1, weight_decay=0.0, batch_size=100, seed=0, device="cpu", progress=False)

# ----------------------------------------------------------------------------------------------
# Linear probe and k-NN on synthetic features


def test_linear_probe_exceeds_90_percent_on_separable_classes():
    result = probe.train_linear_probe(*gaussian_blobs(10, 40, seed=1), *gaussian_blobs(10, 20, seed=2),
                                      **PROBE_KWARGS)
    assert result["top1"] > 90.0
    assert result["top5"] > 95.0
    assert result["top5_k"] == 5


def test_linear_probe_ignores_unlabeled_training_samples():
    train_feats, train_labels = gaussian_blobs(10, 40, seed=1)
    unlabeled = torch.randn(200, train_feats.shape[1]) * 10  # would break cross-entropy if kept
    feats = torch.cat([train_feats, unlabeled])
    labels = torch.cat([train_labels, torch.full((200,), probe.UNLABELED)])
    result = probe.train_linear_probe(feats, labels, *gaussian_blobs(10, 20, seed=2), **PROBE_KWARGS)
    assert result["top1"] > 90.0


def test_top5_with_fewer_than_five_classes_ranks_all_classes():
    result = probe.train_linear_probe(*gaussian_blobs(3, 40, seed=1), *gaussian_blobs(3, 20, seed=2),
                                      **PROBE_KWARGS)
    assert result["top5_k"] == 3
    assert result["top5"] == 100.0


def test_probe_epochs_grow_until_min_steps_on_small_sets():
    # 3,000 features at batch 256: 11 steps per epoch, so 100 epochs are 1,100 steps < 3,000
    assert probe.probe_epochs(3000, epochs=100, batch_size=256, min_steps=3000) == 273  # ceil(3000 / 11)
    # ImageNet-100 (126,689 features): 494 steps per epoch, 100 epochs already exceed min_steps
    assert probe.probe_epochs(126_689, epochs=100, batch_size=256, min_steps=3000) == 100
    assert probe.probe_epochs(10, epochs=5, batch_size=256, min_steps=0) == 5  # one short batch per epoch


def test_linear_probe_runs_at_least_min_steps(monkeypatch):
    steps = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    result = probe.train_linear_probe(*gaussian_blobs(10, 40, seed=1), *gaussian_blobs(10, 20, seed=2),
                                      **{**PROBE_KWARGS, "epochs": 1}, min_steps=50)
    assert (result["epochs"], result["steps"]) == (13, 52)  # what the result reports is what ran
    assert len(steps) == 52  # 400 samples at batch 100: 4 steps per epoch, ceil(50 / 4) = 13 epochs


def test_linear_probe_is_reproducible_for_a_seed():
    train, val = gaussian_blobs(10, 40, seed=1, spread=4.0), gaussian_blobs(10, 20, seed=2, spread=4.0)
    first = probe.train_linear_probe(*train, *val, **PROBE_KWARGS)
    assert probe.train_linear_probe(*train, *val, **PROBE_KWARGS) == first


def test_knn_on_separable_features_is_perfect():
    top1 = probe.knn_top1(*gaussian_blobs(10, 40, seed=1), *gaussian_blobs(10, 20, seed=2), num_classes=10)
    assert top1 == 100.0


def test_knn_result_does_not_depend_on_the_chunk_size():
    train, val = gaussian_blobs(10, 40, seed=1, spread=6.0), gaussian_blobs(10, 20, seed=2, spread=6.0)
    whole = probe.knn_top1(*train, *val, num_classes=10, chunk_size=10_000)
    assert 20.0 < whole < 100.0  # noisy enough that a chunking bug would show
    assert probe.knn_top1(*train, *val, num_classes=10, chunk_size=7) == whole


# ----------------------------------------------------------------------------------------------
# Extraction and cache


def test_cli_pixels_probes_the_images_themselves(betons, tmp_path):
    out = tmp_path / "pixels.json"
    proc = run_probe("--eval.pixels=1", "--data.image_size=16", f"--eval.train_dataset={betons[0]}",
                     f"--eval.val_dataset={betons[1]}", "--eval.epochs=5", "--eval.min_steps=0", "--eval.num_workers=1",
                     f"--eval.cache_dir={tmp_path / 'features'}", f"--eval.out={out}")
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        result = json.load(f)
    assert (result["encoder"], result["arch"], result["checkpoint"]) == ("pixels", "pixels", None)
    assert result["feature_dim"] == 3 * 16 * 16
    assert result["top1"] == 100.0  # dark against bright images: separable by their pixels


def test_cli_pixels_with_a_checkpoint_fails_with_one_line(betons, checkpoint):
    proc = run_probe(*probe_args(checkpoint, betons, "--eval.pixels=1"))
    assert_one_line_error(proc, "eval.pixels", "without eval.checkpoint")


def uint8_batches(num_batches, batch_size, image_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g),
             torch.arange(batch_size, dtype=torch.int64), torch.zeros(batch_size, dtype=torch.int64))
            for _ in range(num_batches)]


def test_extract_features_concatenates_the_last_k_blocks_ending_with_the_final_layer():
    torch.manual_seed(0)
    encoder = build_encoder(TINY["arch"], patch_size=TINY["patch_size"], image_size=TINY["image_size"])
    batches = uint8_batches(2, 3, TINY["image_size"])
    last, labels = probe.extract_features(encoder, batches, device="cpu", dtype=torch.float32, progress=False)
    last3, _ = probe.extract_features(encoder, batches, device="cpu", dtype=torch.float32, last_k_blocks=3,
                                      progress=False)
    assert last.shape == (6, encoder.embed_dim) and last.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert last3.shape == (6, 3 * encoder.embed_dim)
    torch.testing.assert_close(last3[:, -encoder.embed_dim:], last)


def test_grid_features_are_every_token_flattened_and_their_mean_is_the_pooled_feature():
    torch.manual_seed(0)
    encoder = build_encoder(TINY["arch"], patch_size=TINY["patch_size"], image_size=TINY["image_size"])
    batches = uint8_batches(2, 3, TINY["image_size"])
    pooled, _ = probe.extract_features(encoder, batches, device="cpu", dtype=torch.float32, progress=False)
    grid, labels = probe.extract_features(encoder, batches, device="cpu", dtype=torch.float32, tokens="grid",
                                          progress=False)
    tokens = (TINY["image_size"] // TINY["patch_size"]) ** 2
    assert grid.shape == (6, tokens * encoder.embed_dim) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(grid.view(6, tokens, encoder.embed_dim).mean(dim=1), pooled)
    with pytest.raises(ValueError, match="last_k_blocks=1"):
        probe.extract_features(encoder, batches, device="cpu", dtype=torch.float32, tokens="grid", last_k_blocks=2)


def test_cli_grid_probe_has_its_own_cached_features_and_json_beside_the_mean_probe(betons, checkpoint, tmp_path):
    mean = run_probe(*probe_args(checkpoint, betons, f"--eval.cache_dir={tmp_path}", f"--eval.out={tmp_path}/m.json"))
    assert mean.returncode == 0, mean.stderr
    grid = run_probe(*probe_args(checkpoint, betons, "--eval.tokens=grid", f"--eval.cache_dir={tmp_path}"))
    assert grid.returncode == 0, grid.stderr
    with open(os.path.join(os.path.dirname(checkpoint), "probe_tinytwo_target_grid.json")) as f:
        result = json.load(f)  # not the mean probe's cache, though both share the folder
    assert (result["tokens"], result["feature_dim"], result["cache_hits"]) == ("grid", 16 * 192, {"train": False,
                                                                                                 "val": False})


def test_cli_grid_of_pixels_fails_with_one_line(betons):
    proc = run_probe("--eval.pixels=1", "--eval.tokens=grid", "--data.image_size=16",
                     f"--eval.train_dataset={betons[0]}", f"--eval.val_dataset={betons[1]}")
    assert_one_line_error(proc, "eval.pixels", "eval.tokens must be mean")


def test_cli_grid_of_several_blocks_fails_with_one_line(betons, checkpoint):
    proc = run_probe(*probe_args(checkpoint, betons, "--eval.tokens=grid", "--eval.last_k_blocks=2"))
    assert_one_line_error(proc, "eval.tokens=grid", "eval.last_k_blocks must be 1")


def test_pixel_features_are_the_normalised_images_flattened():
    from hjepa.loaders import normalize_images

    batches = uint8_batches(2, 3, 8)
    features, labels = probe.extract_features(probe.Pixels(), batches, device="cpu", dtype=torch.float32,
                                              progress=False)
    expected = torch.cat([normalize_images(images, "cpu", torch.float32).flatten(1) for images, _, _ in batches])
    assert features.shape == (6, 3 * 8 * 8) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_extract_features_keeps_labels_the_loader_overwrites_later():
    # FFCV hands out the same output buffers batch after batch; kept labels must be copies.
    encoder = build_encoder(TINY["arch"], patch_size=TINY["patch_size"], image_size=TINY["image_size"])
    images, _, dataset_idx = uint8_batches(1, 3, TINY["image_size"])[0]
    shared_labels = torch.empty(3, dtype=torch.int64)

    def reused_buffer_batches():
        for batch_label in range(2):
            shared_labels.fill_(batch_label)
            yield images, shared_labels, dataset_idx

    _, labels = probe.extract_features(encoder, reused_buffer_batches(), device="cpu", dtype=torch.float32,
                                       progress=False)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_feature_cache_skips_extraction_the_second_time(tmp_path):
    calls = []

    def extract():
        calls.append(1)
        return torch.randn(5, 4), torch.arange(5)

    key = {"weights": "abc", "dataset": {"checksum": "123"}, "last_k_blocks": 1}
    path = probe.feature_cache_path(tmp_path, key, name="cifar10_train_target")
    first = probe.cached_features(path, key, extract)
    second = probe.cached_features(path, key, extract)
    assert len(calls) == 1
    assert (first[2], second[2]) == (False, True)
    torch.testing.assert_close(second[0], first[0])
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp file left behind


def test_feature_cache_key_covers_weights_dataset_and_blocks(tmp_path):
    key = {"weights": "abc", "dataset": {"checksum": "123"}, "last_k_blocks": 1}
    paths = {probe.feature_cache_path(tmp_path, {**key, **change}, name="x")
             for change in ({}, {"weights": "abd"}, {"dataset": {"checksum": "124"}}, {"last_k_blocks": 2})}
    assert len(paths) == 4


def test_state_dict_digest_changes_with_any_weight():
    encoder = build_encoder(TINY["arch"], patch_size=TINY["patch_size"], image_size=TINY["image_size"])
    before = probe.state_dict_digest(encoder.state_dict())
    with torch.no_grad():
        encoder.blocks[5].mlp.fc1.bias[3] += 1e-3
    assert probe.state_dict_digest(encoder.state_dict()) != before


# ----------------------------------------------------------------------------------------------
# Command line (real subprocesses on real betons)


def write_tiny_beton(path, split, num_per_class, seed):
    """Two classes of 40x40 images: dark ones (label 0) and bright ones (label 1)."""
    from hjepa.beton import write_beton

    rng = np.random.default_rng(seed)
    samples = [(rng.integers(low, low + 100, (40, 40, 3), dtype=np.uint8), label)
               for label, low in ((0, 0), (1, 155)) for _ in range(num_per_class)]
    write_beton(samples, str(path), dataset="tinytwo", split=split, class_names=["dark", "bright"],
                source="tests/test_probe.py", num_workers=1, progress=False)
    return str(path)


def save_tiny_checkpoint(path, model_config, encoder_config=None):
    """A checkpoint in hjepa.checkpoint's format whose encoders are built from `encoder_config`."""
    encoder_config = encoder_config or model_config
    torch.manual_seed(0)
    encoder = build_encoder(encoder_config["arch"], patch_size=encoder_config["patch_size"],
                            image_size=encoder_config["image_size"])
    state = encoder.state_dict()
    save_checkpoint({"model_config": dict(model_config), "context_encoder": state, "target_encoder": state,
                     "predictor": {}, "level_heads": {}, "optimizer": {}, "step": 10, "epoch": 1,
                     "config": {}, "rng": {}, "sampler": {}}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    folder = tmp_path_factory.mktemp("betons")
    return (write_tiny_beton(folder / "train.beton", "train", 12, seed=0),
            write_tiny_beton(folder / "val.beton", "val", 6, seed=1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", TINY)


def run_probe(*args):
    return subprocess.run([sys.executable, "eval/linear_probe.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def probe_args(checkpoint, betons, *extra):
    return [f"--eval.checkpoint={checkpoint}", f"--eval.train_dataset={betons[0]}",
            f"--eval.val_dataset={betons[1]}", "--eval.epochs=5", "--eval.min_steps=0", "--eval.num_workers=1",
            "--eval.extract_batch_size=8", *extra]


@pytest.fixture(scope="module")
def first_run(checkpoint, betons):
    proc = run_probe(*probe_args(checkpoint, betons))
    assert proc.returncode == 0, proc.stderr
    cache_dir = os.path.join(os.path.dirname(checkpoint), "features")
    cache_mtimes = {name: os.stat(os.path.join(cache_dir, name)).st_mtime_ns for name in os.listdir(cache_dir)}
    return proc, cache_mtimes


def test_cli_writes_results_json_next_to_the_checkpoint(first_run, checkpoint):
    with open(os.path.join(os.path.dirname(checkpoint), "probe_tinytwo_target.json")) as f:
        result = json.load(f)
    assert result["encoder"] == "target" and result["dataset"] == "tinytwo" and result["arch"] == "vit_tiny"
    assert (result["num_train"], result["num_val"], result["feature_dim"]) == (24, 12, 192)
    for key in ("top1", "top5", "knn_top1"):
        assert 0.0 <= result[key] <= 100.0
    assert result["cache_hits"] == {"train": False, "val": False}
    assert "extract" in first_run[0].stderr and "probe" in first_run[0].stderr  # tqdm bars


def test_cli_second_run_reuses_cached_features(first_run, checkpoint, betons, tmp_path):
    proc = run_probe(*probe_args(checkpoint, betons, f"--eval.out={tmp_path / 'again.json'}"))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "again.json") as f:
        assert json.load(f)["cache_hits"] == {"train": True, "val": True}
    cache_dir = os.path.join(os.path.dirname(checkpoint), "features")
    assert {name: os.stat(os.path.join(cache_dir, name)).st_mtime_ns for name in os.listdir(cache_dir)} \
        == first_run[1]
    assert "extract" not in proc.stderr


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for fragment in fragments:
        assert fragment in errors[0]


def test_cli_missing_checkpoint_fails_with_one_line(betons, tmp_path):
    proc = run_probe(*probe_args(tmp_path / "nope.pt", betons))
    assert_one_line_error(proc, "checkpoint not found", "nope.pt")


def test_cli_file_that_is_not_a_checkpoint_fails_with_one_line(betons, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    proc = run_probe(*probe_args(tmp_path / "other.pt", betons))
    assert_one_line_error(proc, "not an hjepa checkpoint")


def test_cli_checkpoint_of_another_architecture_fails_with_one_line(betons, tmp_path):
    # model_config says vit_small, the saved weights are vit_tiny's
    path = save_tiny_checkpoint(tmp_path / "checkpoint.pt", {**TINY, "arch": "vit_small"}, encoder_config=TINY)
    proc = run_probe(*probe_args(path, betons))
    assert_one_line_error(proc, "does not match", "vit_small", "shape of")


def test_cli_random_init_probes_an_untrained_encoder_of_the_model_section(betons, tmp_path):
    # The same beton as train and val: the val features come from the train entry of the cache.
    out = tmp_path / "random.json"
    proc = run_probe("--eval.random_init=1", "--model.arch=vit_tiny", "--model.patch_size=8",
                     "--data.image_size=32", f"--eval.train_dataset={betons[0]}", f"--eval.val_dataset={betons[0]}",
                     "--eval.epochs=5", "--eval.min_steps=0", "--eval.num_workers=1", f"--eval.cache_dir={tmp_path / 'features'}",
                     f"--eval.out={out}")
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        result = json.load(f)
    assert (result["encoder"], result["arch"], result["checkpoint"]) == ("random", "vit_tiny", None)
    assert result["cache_hits"] == {"train": False, "val": True}


# ----------------------------------------------------------------------------------------------
# What the features hold: shares of variance (bench/feature_variance.py)


def test_features_affine_in_the_regressors_are_fully_explained():
    regressors = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    features = regressors @ torch.randn(3, 6, generator=torch.Generator().manual_seed(1)) + 7.0
    assert probe.explained_variance(features, regressors) == pytest.approx(1.0)


def test_features_uncorrelated_with_the_regressors_are_not_explained():
    regressors = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    features = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])  # orthogonal to the regressor, both centred
    assert probe.explained_variance(features, regressors) == pytest.approx(0.0, abs=1e-12)


def test_each_dimension_counts_equally_whatever_its_scale_and_constant_ones_are_left_out():
    regressors = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    explained, unexplained, constant = 100.0 * regressors, torch.tensor([[1.0], [1.0], [-1.0], [-1.0]]), torch.ones(4, 1)
    features = torch.cat([explained, unexplained, constant], dim=1)  # R^2 1 and 0: mean 0.5 despite the 100x
    assert probe.explained_variance(features, regressors) == pytest.approx(0.5)


def test_class_indicators_explain_the_between_class_share_of_the_variance():
    # classes 0, 0, 1, 1 with feature 0, 2, 4, 6: class means 1 and 5 around 3; between 16 of total 20
    features, labels = torch.tensor([[0.0], [2.0], [4.0], [6.0]]), torch.tensor([0, 0, 1, 1])
    assert probe.explained_variance(features, probe.class_indicators(labels)) == pytest.approx(0.8)


def test_classes_that_never_occur_change_nothing_and_unlabeled_samples_are_refused():
    features = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    with_gaps = probe.class_indicators(torch.tensor([3, 3, 7, 7]))  # 8 columns, 6 of them zero
    assert probe.explained_variance(features, with_gaps) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unlabeled"):
        probe.class_indicators(torch.tensor([0, probe.UNLABELED]))


def test_colour_regressors_read_whole_image_border_band_and_centre():
    image = torch.zeros(1, 3, 16, 16)
    image[..., :, :] = torch.tensor([10.0, 20.0, 30.0])[:, None, None]       # border band: 2 px (16 / 8)
    image[..., 2:14, 2:14] = torch.tensor([50.0, 60.0, 70.0])[:, None, None]  # inside it, the centre 8x8 too
    colours = probe.colour_regressors(image.to(torch.uint8))
    inside = 144 / 256
    whole = [10 + inside * 40, 20 + inside * 40, 30 + inside * 40]
    torch.testing.assert_close(colours[0], torch.tensor([*whole, 10, 20, 30, 50, 60, 70], dtype=torch.float64))


def run_feature_variance(*args):
    return subprocess.run([sys.executable, "bench/feature_variance.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_feature_variance_cli_shares_per_encoder_and_per_seeded_group(betons, checkpoint, tmp_path):
    out = tmp_path / "variance.json"
    proc = run_feature_variance(f"--beton={betons[0]}", "--random-init-seeds=0,1", "--num-workers=1",
                                f"--out={out}", checkpoint)
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        result = json.load(f)
    assert [row["name"] for row in result["rows"]] == ["run0", "random init-s0", "random init-s1"]
    for row in result["rows"]:
        assert all(0.0 <= row[key] <= 1.0 + 1e-9 for key in ("class", "colour", "border", "centre"))
    assert result["colour_explained_by_class"] > 0.99  # the tiny classes are dark and bright images
    assert result["groups"]["random init"]["seeds"] == 2
    assert result["groups"]["random init"]["class"][0] == pytest.approx(
        (result["rows"][1]["class"] + result["rows"][2]["class"]) / 2)
    assert "mean ± std" in proc.stdout


def load_feature_variance():
    import importlib.util

    spec = importlib.util.spec_from_file_location("feature_variance", os.path.join(REPO, "bench", "feature_variance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_feature_variance_reads_the_one_mean_token_probe_beside_a_checkpoint(tmp_path):
    feature_variance = load_feature_variance()
    checkpoint = str(tmp_path / "checkpoint.pt")
    assert feature_variance.probe_top1(checkpoint, "target") is None
    with open(tmp_path / "probe.json", "w") as f:
        json.dump({"top1": 71.5, "encoder": "target", "last_k_blocks": 1}, f)
    assert feature_variance.probe_top1(checkpoint, "target") == 71.5
    assert feature_variance.probe_top1(checkpoint, "context") is None  # another encoder's probe
    with open(tmp_path / "probe_fashion_mnist_target.json", "w") as f:
        json.dump({"top1": 70.0, "encoder": "target"}, f)
    assert feature_variance.probe_top1(checkpoint, "target") is None  # two results: which one is unknown
    rows = [{"class": c, "colour": 1 - c, "border": 0.5, "centre": c, "top1": t}
            for c, t in ((0.1, 60.0), (0.2, 70.0), (0.3, 80.0))] + [{"class": 0.9, "top1": None}]
    correlation = feature_variance.correlations(rows)
    assert (correlation["class"], correlation["colour"], correlation["rows"]) == (pytest.approx(1.0), pytest.approx(-1.0), 3)
    assert correlation["border"] is None  # constant over the rows: no correlation to speak of


def test_feature_variance_cli_missing_beton_fails_with_one_line(checkpoint, tmp_path):
    proc = run_feature_variance(f"--beton={tmp_path / 'none.beton'}", checkpoint)
    assert_one_line_error(proc, "no beton at", "none.beton")
