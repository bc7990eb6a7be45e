"""Frozen-encoder evaluation: feature extraction (cached on disk), linear probe, weighted k-NN.

Library code: plain keyword arguments, no config. `eval/linear_probe.py` is the entry point.
"""
import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hjepa.errors import UserError

UNLABELED = -1  # label of samples without a class (STL-10 unlabeled split); never trained or scored on


# ----------------------------------------------------------------------------------------------
# Feature extraction


@torch.inference_mode()
def extract_features(encoder, loader, *, device, dtype, last_k_blocks=1, tokens="mean", progress=True):
    """Features of a frozen encoder for every image of `loader`, in loader order: its tokens averaged
    (the default), or every token (tokens="grid").

    `dtype` is the compute dtype: torch.bfloat16 runs under autocast (CUDA), torch.float32 or None
    runs plain fp32 (CPU). With last_k_blocks=1 the feature is the mean over tokens of
    `forward_features`, which ends with the encoder's final LayerNorm (I-JEPA's probe input); the
    per-batch copy to the CPU does not stall loading, since FFCV decodes ahead in its own thread.
    With k > 1 the final LayerNorm
    `encoder.norm` is applied to each of the last k block outputs before pooling (DINO's
    `get_intermediate_layers` convention), so every block's slice is on the same scale; the slices
    are concatenated from the earliest of the k blocks to the last.
    tokens="grid" keeps every token instead of their mean: the (T, D) output of `forward_features`
    flattened to T * D features (row-major over the patch grid), with last_k_blocks 1.

    Returns (features float32 (N, D * k) or (N, T * D) on the CPU, labels int64 (N,)).
    """
    if tokens not in ("mean", "grid"):
        raise ValueError(f"tokens must be 'mean' or 'grid', got {tokens!r}")
    if tokens == "grid" and last_k_blocks != 1:
        raise ValueError("tokens='grid' reads the last block only (last_k_blocks=1)")
    # Imported here, not at the top: hjepa.loaders imports ffcv, which JIT-compiles for seconds at import,
    # and the probe and k-NN functions below need none of it.
    from hjepa.loaders import normalize_images

    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    feature_chunks, label_chunks = [], []
    bar = tqdm(total=_num_samples(loader), desc="extract", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        for images, labels, _dataset_idx in loader:
            x = normalize_images(images, device, torch.float32)  # (B, 3, H, W)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype not in (None, torch.float32)):
                if tokens == "grid":
                    features = encoder.forward_features(x).flatten(1)  # (B, N, D) -> (B, N * D)
                elif last_k_blocks == 1:
                    features = encoder.forward_features(x).mean(dim=1)  # (B, N, D) -> (B, D)
                else:
                    block_outputs = encoder.forward_blocks(x)[-last_k_blocks:]  # k x (B, N, D)
                    features = torch.cat([encoder.norm(out).mean(dim=1) for out in block_outputs], dim=1)  # (B, k*D)
            feature_chunks.append(features.float().cpu())
            # A copy: FFCV reuses its output buffers, so a kept batch tensor is overwritten by later ones.
            label_chunks.append(labels.to(torch.int64, copy=True).cpu())
            bar.update(len(labels))
    finally:  # the caller's encoder goes back to its mode even when extraction fails
        bar.close()
        encoder.train(was_training)
    return torch.cat(feature_chunks), torch.cat(label_chunks)


class Pixels(torch.nn.Module):
    """The identity as an encoder: each image's normalised pixels, flattened, as its one token, so
    `extract_features` returns the raw-pixel features (C*H*W) that a linear probe of a learned encoder
    is compared with: what the probe reaches with no encoder at all."""

    depth = 1  # one 'block': eval/linear_probe.py checks eval.last_k_blocks against an encoder's depth

    def forward_features(self, x):  # (B, C, H, W) -> (B, 1, C*H*W)
        return x.flatten(1).unsqueeze(1)


def _num_samples(loader):
    """Samples the bar should expect: hjepa.loaders's JepaLoader wraps an ffcv.Loader whose `indices`
    lists what it reads; any other iterable gets a bar without a total."""
    indices = getattr(getattr(loader, "loader", loader), "indices", None)
    return len(indices) if indices is not None else None


# ----------------------------------------------------------------------------------------------
# Feature cache


def state_dict_digest(state_dict):
    """sha256 over the names, dtypes, shapes and bytes of every tensor: identifies the weights themselves."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def feature_cache_path(cache_dir, key, *, name):
    """`<cache_dir>/<name>-<hash of key>.pt`; `key` is a JSON-able dict of everything the features depend on.

    `name` comes from a beton's manifest (dataset, split), which may be someone else's file.
    """
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return resolve_inside(cache_dir, f"{name}-{key_hash}.pt")


def resolve_inside(folder, relative_path):
    """folder/relative_path as an absolute path; UserError if it would lead outside `folder`
    ('../', an absolute path or a symlink): a name read from a manifest must not choose where we write."""
    path = os.path.join(folder, relative_path)
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_folder, os.path.realpath(path)]) != real_folder:
        raise UserError(f"{relative_path!r} (from a manifest) leads outside {folder}")
    return path


def load_cached_features(path, key):
    """(features, labels) from a cache file written for exactly `key`, else None."""
    if not os.path.isfile(path):
        return None
    entry = torch.load(path, map_location="cpu", weights_only=True)
    if entry.get("key") != json.dumps(key, sort_keys=True):  # guards against a hash-prefix collision
        return None
    return entry["features"], entry["labels"]


def save_cached_features(path, key, features, labels):
    """Write atomically (temp file + rename): a crash mid-write never leaves a truncated cache entry."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"key": json.dumps(key, sort_keys=True), "features": features, "labels": labels}, tmp)
    os.replace(tmp, path)


def cached_features(path, key, extract):
    """Load the features for `key` from `path`, or call `extract()` -> (features, labels) and store them.

    Returns (features, labels, hit) with hit=True when nothing was extracted.
    """
    cached = load_cached_features(path, key)
    if cached is not None:
        return (*cached, True)
    features, labels = extract()
    save_cached_features(path, key, features, labels)
    return features, labels, False


# ----------------------------------------------------------------------------------------------
# Linear probe


def labeled(features, labels):
    """Drop unlabeled samples (label -1): they can be neither trained on nor scored."""
    keep = labels != UNLABELED
    return features[keep], labels[keep]


def probe_epochs(num_samples, *, epochs, batch_size, min_steps):
    """Epochs the probe trains for: `epochs`, or more when that would take fewer than `min_steps` steps.

    A probe is judged converged, not run for a fixed number of passes: on small sets a fixed epoch
    count is a handful of steps (100 epochs of 3,000 features at batch 1024 are 200 steps, which left
    a random-init encoder's probe 8 points and a pretrained one's 5 points short on Fashion-MNIST).
    """
    steps_per_epoch = max(1, num_samples // batch_size)
    return max(epochs, -(-min_steps // steps_per_epoch))


def train_linear_probe(train_feats, train_labels, val_feats, val_labels, *, epochs, lr, weight_decay,
                       batch_size, seed, device, progress=True, num_classes=None, min_steps=0):
    """Train `BatchNorm1d(affine=False) + Linear` on frozen features; top-1/top-5 (percent) on val.

    Recipe: SGD, momentum 0.9, cosine decay from `lr` to 0 over all steps, no warmup, cross-entropy,
    for `probe_epochs(...)` epochs (at least `min_steps` steps). The parameter-free BatchNorm
    standardises every feature dimension (MAE's probe, Sec. A.2), so the problem is well conditioned
    whatever the encoder's feature scale. `lr` is absolute, not rescaled with the batch size.
    The defaults (eval section: batch 256, lr 0.5, >= 3,000 steps) match a full-batch L-BFGS fit of
    the same probe on cached Fashion-MNIST features (3,000 x 96) within 1 point on the mean over
    three seeds (2.6 at most per seed) for random-init and pretrained vit_micro encoders alike.
    Unlabeled samples are excluded from both sets. With fewer than 5 classes the top-5 is computed
    as top-C (every class is within the top 5, so it is 100%); `top5_k` in the result says which k
    was used, `epochs` and `steps` how long the probe trained.
    """
    device = torch.device(device)
    train_feats, train_labels = labeled(train_feats, train_labels)
    val_feats, val_labels = labeled(val_feats, val_labels)
    if len(train_labels) < 2:
        raise ValueError(f"a linear probe needs at least 2 labeled training samples, got {len(train_labels)}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max() if len(val_labels) else 0)) + 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the Linear layer's init
    probe = torch.nn.Sequential(
        torch.nn.BatchNorm1d(train_feats.shape[1], affine=False),
        torch.nn.Linear(train_feats.shape[1], num_classes),
    ).to(device)
    torch.nn.init.trunc_normal_(probe[1].weight, std=0.01)  # MAE's probe-head init
    torch.nn.init.zeros_(probe[1].bias)

    x_train = train_feats.to(device, torch.float32)  # (N, D)
    y_train = train_labels.to(device)
    # drop_last keeps BatchNorm statistics from a 1-sample batch; fewer samples than a batch = one batch
    steps_per_epoch = max(1, len(y_train) // batch_size)
    epochs = probe_epochs(len(y_train), epochs=epochs, batch_size=batch_size, min_steps=min_steps)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))

    probe.train()
    bar = tqdm(range(epochs), desc="probe", unit="epoch", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(len(y_train), generator=generator).to(device)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(probe(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")  # one device sync per epoch
    bar.close()

    probe.eval()
    with torch.inference_mode():
        logits = torch.cat([probe(chunk.to(device, torch.float32)) for chunk in val_feats.split(8192)])  # (M, C)
    return {**topk_accuracy(logits, val_labels.to(device)), "epochs": epochs, "steps": total_steps}


def topk_accuracy(logits, labels):
    """{"top1", "top5", "top5_k"} in percent; top-5 uses k = min(5, num_classes)."""
    if len(labels) == 0:
        raise ValueError("no labeled validation samples to score")
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices == labels[:, None]  # (M, k)
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits.any(dim=1).float().mean().item(),
        "top5_k": k,
    }


# ----------------------------------------------------------------------------------------------
# k-NN


@torch.inference_mode()
def knn_top1(train_feats, train_labels, val_feats, val_labels, *, k=20, temperature=0.07, num_classes,
             chunk_size=256, device=None):
    """Weighted k-NN top-1 (percent), DINO's recipe (Caron et al. 2021, Sec. 4.1 / eval_knn.py).

    Cosine similarity between L2-normalised features; each of the k nearest training samples votes
    for its class with weight exp(similarity / temperature). Validation samples are processed
    `chunk_size` at a time so the (chunk, N_train) similarity matrix stays small (256 x 126k floats
    = 130 MB for ImageNet-100). Unlabeled samples are excluded from the bank and from scoring.
    """
    device = torch.device(device) if device is not None else train_feats.device
    train_feats, train_labels = labeled(train_feats, train_labels)
    val_feats, val_labels = labeled(val_feats, val_labels)
    if len(train_labels) == 0 or len(val_labels) == 0:
        raise ValueError("k-NN needs labeled training and validation samples")
    k = min(k, len(train_labels))
    bank = F.normalize(train_feats.to(device, torch.float32), dim=1)  # (N, D)
    bank_labels = train_labels.to(device)
    correct = 0
    for start in range(0, len(val_labels), chunk_size):
        queries = F.normalize(val_feats[start:start + chunk_size].to(device, torch.float32), dim=1)  # (b, D)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(queries), num_classes, device=device)  # (b, C)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == val_labels[start:start + chunk_size].to(device)).sum().item()
    return 100.0 * correct / len(val_labels)


def knn_monitor(encoder, bank_loader, query_loader, *, device, dtype, k=20, temperature=0.07):
    """k-NN top-1 (percent) of `encoder` during training: bank from one eval loader, queries from another.

    extract_features runs the encoder in eval mode and gives it back in the mode it was in.
    """
    bank_feats, bank_labels = extract_features(encoder, bank_loader, device=device, dtype=dtype, progress=False)
    query_feats, query_labels = extract_features(encoder, query_loader, device=device, dtype=dtype, progress=False)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return knn_top1(bank_feats, bank_labels, query_feats, query_labels, k=k, temperature=temperature,
                    num_classes=num_classes, device=device)


# ----------------------------------------------------------------------------------------------
# What the features hold


def explained_variance(features, regressors):
    """Share (0..1) of the variance of `features` (N, D) that an affine least-squares map of
    `regressors` (N, K) explains, each feature dimension first scaled to unit variance (what the linear
    probe's BatchNorm does), so the share is the mean over dimensions of each one's R^2. Dimensions
    that are constant (dead units; below 1e-6 of the largest std) are left out.

    The fit is scored on the samples it was fitted to, so K regressors that hold nothing still explain
    about K / (N - 1) by chance: 0.003 for 10 classes on 3,000 images. Computed on the CPU in float64
    with an SVD-based solver (gelsd), which is exact for rank-deficient designs such as one-hot
    classes next to the intercept (CUDA's only driver, gels, is not)."""
    features = features.detach().cpu().double()
    features = features - features.mean(0)
    std = features.std(0)
    alive = std > 1e-6 * std.max()
    if not alive.any():
        raise ValueError("every feature dimension is constant: nothing to explain")
    features = features[:, alive] / std[alive]
    regressors = regressors.detach().cpu().double()
    design = torch.cat([regressors - regressors.mean(0), torch.ones(len(regressors), 1, dtype=torch.float64)],
                       dim=1)  # (N, K + 1)
    fitted = design @ torch.linalg.lstsq(design, features, driver="gelsd").solution  # (N, D')
    return float((fitted ** 2).sum() / (features ** 2).sum())


def class_indicators(labels):
    """(N, C) one-hot rows of labels 0..C-1 (classes that never occur give zero columns, which the
    fit ignores): the regressors whose fit is each class's mean. Unlabeled samples (-1) must be
    dropped first (`labeled`)."""
    if (labels < 0).any():
        raise ValueError("unlabeled samples (label -1) have no class indicator: drop them with labeled()")
    return F.one_hot(labels.long()).double()


def colour_regressors(images):
    """(B, 9) per image of uint8 or float (B, 3, H, W) images: mean RGB of the whole image, of its
    border band (the outer eighth of each side, where backgrounds show) and of its centre (the middle
    half of each side, where objects tend to be)."""
    images = images.double()
    h, w = images.shape[-2:]
    band_h, band_w = max(1, h // 8), max(1, w // 8)
    border = torch.ones(h, w, dtype=torch.bool)
    border[band_h:h - band_h, band_w:w - band_w] = False
    centre = images[..., h // 4:h - h // 4, w // 4:w - w // 4]
    return torch.cat([images.mean((2, 3)), images[..., border].mean(2), centre.mean((2, 3))], dim=1)
