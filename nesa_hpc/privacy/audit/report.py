"""The audit's files on rank 0: audit.csv, audit.json, audit.h5 (and audit_gradient.csv), and three figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ...io import jsonfile
from .gradient import GRAD_COLUMNS

__all__ = ["COLUMNS", "write", "plot"]

COLUMNS = ("k", "mechanism", "unit", "epsilon", "epsilon_row", "delta", "sigma", "clip", "noise_to_signal",
           "perplexity", "perplexity_ratio", "cosine", "nn_recovery", "map_recovery", "head_recovery", "probe_recovery",
           "inverter_recovery", "model_map_recovery", "particle_recovery", "best_recovery", "oracle_context_recovery",
           "floor", "p_prior", "p_context", "bound", "bound_gdp", "bound_gdp_context", "eval_tokens", "public_tokens",
           "unigram_perplexity", "owner_alone_perplexity")


def write(out: Path, table: list[dict], meta: dict, grad_rows: list[dict] = ()) -> None:
    """audit.csv, audit.json and audit.h5 (the table; ``meta`` as the HDF5 file's attributes), and
    audit_gradient.csv when the gradient message was audited."""
    import h5py

    if grad_rows:
        with open(out / "audit_gradient.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=GRAD_COLUMNS)
            w.writeheader()
            for r in grad_rows:
                w.writerow({c: r[c] for c in GRAD_COLUMNS})

    with open(out / "audit.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in table:
            w.writerow({c: r[c] for c in COLUMNS})
    report = {"meta": meta, "rows": table, "gradient": list(grad_rows)}
    (out / "audit.json").write_text(jsonfile.dumps(report, indent=1))
    with h5py.File(out / "audit.h5", "w") as f:
        for c in COLUMNS:
            values = [r[c] for r in table]
            f[c] = np.array(values, dtype=h5py.string_dtype()) if isinstance(values[0], str) else np.array(values)
        for key, value in meta.items():
            f.attrs[key] = value


def plot(out: Path, table: list[dict], meta: dict) -> None:
    """The three figures: audit_utility.png, audit_leakage.png and audit_frontier.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = _Figures(table, meta)
    for draw, name, fontsize, bottom in ((figures.utility, "audit_utility.png", 7, 0.1),
                                         (figures.leakage, "audit_leakage.png", 7, 0.12),
                                         (figures.frontier, "audit_frontier.png", 6, 0.1)):
        fig = draw(plt)
        fig.text(0.01, 0.01, figures.caption, fontsize=fontsize)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


class _Figures:
    """The figures of one table: the privacy level on the x axis (epsilon or sigma), one series per split point."""

    def __init__(self, table: list[dict], meta: dict) -> None:
        self.table = table
        self.gaussian = meta["mechanism"] == "gaussian"
        self.xkey = "epsilon" if self.gaussian else "sigma"
        kind = "(eps, delta)-DP Gaussian" if self.gaussian else "Gaussian noise, no formal claim"
        self.caption = (f"{kind}, delta={meta['delta']:g}, C = percentile {meta['clip_percentile']:g} of unit norms "
                        "on public text; unit: token at k=0, sequence at k>0.\nAttackers see Z and know the model and "
                        "public text (probe trained on it "
                        "through the same mechanism; at k=0 a particle filter uses the LM as prior, at k>0 the "
                        "model-aware MAP decoder runs layers [0, k)).")
        self.ks = sorted({r["k"] for r in table})
        self.noisy = [r for r in table if r["mechanism"] != "none"]
        self.clean = {r["k"]: r["perplexity"] for r in table if r["mechanism"] == "none"}

    def series(self, k: int, key: str) -> tuple[list, list]:
        """The noisy rows' (level, ``key``) at split point ``k``, by level."""
        pts = sorted((r[self.xkey], r[key]) for r in self.noisy if r["k"] == k)
        return [p[0] for p in pts], [p[1] for p in pts]

    def alone_ratio(self, k: int) -> float | None:
        """The owner-alone denoiser's perplexity over the noise-free one at ``k`` (None without one)."""
        alone = next((r["owner_alone_perplexity"] for r in self.table if r["k"] == k), math.nan)
        return alone / self.clean[k] if not math.isnan(alone) and k in self.clean else None

    def unigram_ratio(self) -> float:
        return self.table[0]["unigram_perplexity"] / next(iter(self.clean.values()))

    def utility(self, plt):
        """Perplexity ratio and cosine against the level, with the owner-alone baselines."""
        fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, k in enumerate(self.ks):
            x, y = self.series(k, "perplexity_ratio")
            ax[0].plot(x, y, marker="o", color=f"C{i}", label=f"k={k}")
            alone = self.alone_ratio(k)
            if alone is not None:
                ax[0].axhline(alone, color=f"C{i}", ls="--", lw=1, label=f"owner alone, k={k}")
            x, y = self.series(k, "cosine")
            ax[1].plot(x, y, marker="o", label=f"k={k}")
        for a, title in zip(ax, ("perplexity / perplexity without noise", "cosine to noise-free embedding"),
                            strict=True):
            a.set_xscale("log")
            a.set_xlabel(f"{self.xkey} (per token at k=0, per row at k>0)")
            a.set_title(title)
            a.legend()
        if self.table and self.clean:
            ax[0].axhline(self.unigram_ratio(), color="grey", ls=":", lw=1, label="public unigram (owner alone)")
            ax[0].legend(fontsize=7)
        ax[0].set_yscale("log")
        return fig

    def leakage(self, plt):
        """Token recovery per attacker against the level, one panel per split point, with the floor and bounds."""
        fig, ax = plt.subplots(1, len(self.ks), figsize=(4.2 * len(self.ks), 4), squeeze=False)
        for a, k in zip(ax[0], self.ks, strict=True):
            for key, label, color in (("nn_recovery", "nearest neighbour", "C0"),
                                      ("map_recovery", "Bayes MAP decoder (clip-aware)", "C3"),
                                      ("head_recovery", "final norm + LM head", "C1"),
                                      ("probe_recovery", "MLP probe (noise-aware)", "C2"),
                                      ("inverter_recovery", "sequence inverter (noise-aware)", "C4"),
                                      ("model_map_recovery", "model-aware MAP (runs layers [0, k))", "C6"),
                                      ("particle_recovery", "LM-prior particle filter", "C8")):
                x, y = self.series(k, key)
                if not all(math.isnan(v) for v in y):
                    a.plot(x, y, marker="o", color=color, label=label)
            x, y = self.series(k, "floor")
            a.plot(x, y, "k--", label="floor (most frequent token)")
            if self.gaussian:
                x, y = self.series(k, "bound")
                a.plot(x, y, "r:", label="DP bound e^eps p + delta")
                x, y = self.series(k, "bound_gdp")
                a.plot(x, y, "m-.", label="GDP bound, no context: Phi(Phi^-1(p) + mu)")
                x, y = self.series(k, "bound_gdp_context")
                if not all(math.isnan(v) for v in y):
                    a.plot(x, y, color="m", ls=(0, (1, 1)), label="GDP bound, context: mean Phi(Phi^-1(kappa_i) + mu)")
            x, y = self.series(k, "oracle_context_recovery")
            if k == 0 and not all(math.isnan(v) for v in y):
                a.plot(x, y, marker="x", color="C5", ls="--", label="MAP with the true prefix (DP adversary)")
            a.set_xscale("log")
            a.set_ylim(-0.02, 1.02)
            a.set_xlabel(f"{self.xkey} per {'token' if k == 0 else 'row'}")
            a.set_title(f"token recovery, k={k}")
            a.legend(fontsize=7)
        return fig

    def frontier(self, plt):
        """Best recovery against the perplexity ratio: what each level buys."""
        fig, a = plt.subplots(figsize=(6.5, 4.8))
        for i, k in enumerate(self.ks):
            pts = sorted((r for r in self.noisy if r["k"] == k), key=lambda r: r[self.xkey])
            best = [r["best_recovery"] for r in pts]
            a.plot([r["perplexity_ratio"] for r in pts], best, marker="o", color=f"C{i}", label=f"k={k}")
            alone = self.alone_ratio(k)
            if alone is not None:  # to the right of it, the owner does better alone
                a.axvline(alone, color=f"C{i}", ls="--", lw=1, label=f"owner alone, k={k}")
            for r, b in zip(pts, best, strict=True):
                a.annotate(f"{r[self.xkey]:g}", (r["perplexity_ratio"], b), fontsize=6, xytext=(3, 3),
                           textcoords="offset points")
        if self.table and self.clean:
            a.axvline(self.unigram_ratio(), color="grey", ls=":", lw=1, label="public unigram (owner alone)")
        a.set_xscale("log")
        a.set_xlabel("perplexity ratio (utility lost)")
        a.set_ylabel("token recovery (best attacker: at least this)")
        a.set_title(f"leakage-utility frontier (labels: {self.xkey} per token at k=0, per row at k>0)", fontsize=9)
        a.legend()
        return fig
