"""drift: how the recent batch differs from the reference data (labels, lengths, vocabulary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import DriftConfig, Params
from ratchet.data import LABEL, SPLITS, TEXT, normalise
from ratchet.runtime import write_json
from ratchet.stage import stage_main


def drift_stats(reference: pd.DataFrame, recent: pd.DataFrame, cfg: DriftConfig) -> dict:
    """Raw test statistics and p-values for label shift, length shift and vocabulary change."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2_contingency, ks_2samp

    out: dict = {"n_reference": len(reference), "n_recent": len(recent)}
    if len(reference) == 0 or len(recent) == 0:
        out.update(status="no_reference", drifted=False,
                   summary="first batch: nothing to compare")
        return out
    labels = sorted(set(reference[LABEL]) | set(recent[LABEL]))
    ref_counts = reference[LABEL].value_counts().reindex(labels, fill_value=0).to_numpy()
    rec_counts = recent[LABEL].value_counts().reindex(labels, fill_value=0).to_numpy()
    chi2, chi_p, _, _ = chi2_contingency(np.vstack([ref_counts, rec_counts]))
    jsd = float(jensenshannon(ref_counts / ref_counts.sum(), rec_counts / rec_counts.sum(), base=2))
    ref_len = reference[TEXT].str.split().str.len().to_numpy()
    rec_len = recent[TEXT].str.split().str.len().to_numpy()
    ks = ks_2samp(ref_len, rec_len)
    vocab = {w for t in reference[TEXT] for w in normalise(t).split()}
    rec_tokens = [w for t in recent[TEXT] for w in normalise(t).split()]
    oov = float(np.mean([w not in vocab for w in rec_tokens])) if rec_tokens else 0.0
    new_labels = sorted(set(recent[LABEL]) - set(reference[LABEL]))
    label_drift = bool(chi_p < cfg.alpha)
    length_drift = bool(ks.pvalue < cfg.alpha)
    out.update(
        status="compared",
        label_chi2=float(chi2), label_p=float(chi_p), label_jsd=jsd, label_drift=label_drift,
        length_ks=float(ks.statistic), length_p=float(ks.pvalue), length_drift=length_drift,
        mean_len_reference=float(ref_len.mean()), mean_len_recent=float(rec_len.mean()),
        oov_rate=oov, new_labels=new_labels, drifted=label_drift or length_drift,
    )
    parts = [f"labels JSD {jsd:.2f} (p={chi_p:.1g})", f"length KS {ks.statistic:.2f} "
             f"(p={ks.pvalue:.1g})", f"OOV {oov:.0%}"]
    if new_labels:
        parts.append(f"{len(new_labels)} new labels")
    out["summary"] = ("DRIFT: " if out["drifted"] else "no drift: ") + ", ".join(parts)
    return out


def plot(reference: pd.DataFrame, recent: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted(set(reference[LABEL]) | set(recent[LABEL]))
    x = np.arange(len(labels))
    for offset, (name, df) in zip((-0.2, 0.2), (("reference", reference), ("recent", recent)),
                                  strict=True):
        share = df[LABEL].value_counts(normalize=True).reindex(labels, fill_value=0)
        ax1.bar(x + offset, share.to_numpy(), width=0.4, label=f"{name} (n={len(df)})")
        lengths = df[TEXT].str.split().str.len()
        if len(lengths):
            ax2.hist(lengths, bins=range(0, int(lengths.max()) + 2), alpha=0.5, density=True,
                     label=name)
    ax1.set_xticks(x, labels, rotation=75, ha="right", fontsize=7)
    ax1.set_ylabel("share of rows")
    ax1.set_title("label distribution")
    ax1.legend()
    ax2.set_xlabel("words per text")
    ax2.set_title("text length")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(params: Params, *, data: Path, report: Path, plot_path: Path) -> dict:
    rows = pd.concat([pd.read_parquet(data / f"{s}.parquet") for s in SPLITS], ignore_index=True)
    reference, recent = rows[rows["slice"] == "reference"], rows[rows["slice"] == "recent"]
    stats = drift_stats(reference, recent, params.drift)
    write_json(report, stats)
    plot(reference, recent, plot_path)
    return stats


def main() -> None:
    stage_main("drift", __doc__, {
        "data": "folder with train/val/test parquet files",
        "report": "drift report JSON to write",
        "plot_path": "PNG summary plot to write",
    }, run)


if __name__ == "__main__":
    main()
