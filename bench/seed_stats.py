"""Statistics over seeds for bench/ablation.py and its siblings: mean ± sample std, each variant minus a
reference paired by seed, the sign-flip test of a paired mean, and the plain-text tables. Pure functions
of recorded runs ({"<name>|<seed>": {"top1": ..., "knn_top1": ...}}); nothing here trains or reads files.
"""
import numpy as np


def mean_std_n(values):
    """(mean, sample std (0 for one value), count) of a list of numbers."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values)


def summarize(runs, names):
    """{name: {metric: (mean, std, n)}} over seeds; std is the sample std (0 for one seed)."""
    table = {}
    for name in names:
        records = [r for k, r in runs.items() if k.rsplit("|", 1)[0] == name]
        if records:
            table[name] = {}
            for metric in ("top1", "knn_top1"):
                table[name][metric] = mean_std_n([r[metric] for r in records])
    return table


def sign_flip_p(differences):
    """Two-sided p-value of the paired sign-flip test of "no difference": the share of the 2^n ways of
    flipping the signs of the n per-seed differences whose mean lies at least as far from 0 as the
    observed mean (observed assignment included). It assumes only that, with no true difference, each
    seed's difference is as likely negative as positive. Exact for n <= 16; above, 2^16 random sign
    draws (fixed generator) plus the observed one, so p is never below 1 / 65,537 there. Exactly, the
    smallest p that n seeds can give is 2 / 2^n: 0.25 for 3 seeds, 0.0625 for 5."""
    differences = np.asarray(differences, dtype=float)
    n = len(differences)
    if n == 0:
        raise ValueError("no differences to test")
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # (2^n, n): every assignment
    else:
        draws = np.random.default_rng(0).integers(0, 2, size=(2 ** 16, n))
        signs = np.concatenate([np.ones((1, n), dtype=int), 1 - 2 * draws])
    observed = abs(differences.sum())
    flipped = np.abs(signs @ differences)
    return float(np.mean(flipped >= observed - 1e-9 * (1.0 + np.abs(differences).sum())))


def paired_differences(runs, names, reference):
    """{name: {metric: (mean, std, n, {seed: difference}, p)}}: each variant minus `reference` at the
    seeds both have recorded, and the sign-flip p-value of their mean (sign_flip_p). Seeds are shared
    (same init, data order and masks), so the per-seed difference removes what the seeds have in common
    and its spread is the honest one for "is B better than A"."""
    by_seed = {}
    for key, record in runs.items():
        name, seed = key.rsplit("|", 1)
        by_seed.setdefault(name, {})[int(seed)] = record
    table = {}
    for name in names:
        seeds = sorted(set(by_seed.get(name, {})) & set(by_seed.get(reference, {})))
        if name == reference or not seeds:
            continue
        table[name] = {}
        for metric in ("top1", "knn_top1"):
            per_seed = {s: by_seed[name][s][metric] - by_seed[reference][s][metric] for s in seeds}
            table[name][metric] = (*mean_std_n(list(per_seed.values())), per_seed,
                                   sign_flip_p(list(per_seed.values())))
    return table


def format_table(table, signed=False):
    """Mean ± std per variant; signed (a paired table): with each difference's sign-flip p-value."""
    p_head = f"{'p':>7}" if signed else ""
    lines = [f"{'variant':<24}{'seeds':>6}{'linear top-1':>18}{p_head}{'k-NN top-1':>18}{p_head}"]
    for name, row in table.items():
        cells = "".join(f"{m:>+11.1f} ± {s:<4.1f}{rest[1]:>7.3f}" if signed else f"{m:>11.1f} ± {s:<4.1f}"
                        for m, s, _, *rest in (row["top1"], row["knn_top1"]))
        lines.append(f"{name:<24}{row['top1'][2]:>6}{cells}")
    return "\n".join(lines)
