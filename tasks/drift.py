"""drift: how the recent batch differs from the reference data, and whether to retrain.

Labels, lengths, vocabulary and sentence embeddings (MMD permutation test, domain classifier)
are compared by the pure functions of `ratchet.drift`; this stage loads the rows, embeds them
with the champion's encoder (the base model before any champion), and writes the report, the
summary plot and the importance weights of the test split's rows.

The weights apply to the rows of `test.parquet` (keyed by row order and text, and by `id` when
the batches carry one): w(x) estimates
p_recent(x) / p_reference(x), so metrics weighted by w estimate how a model does on data
distributed like the recent batch, using many test rows rather than the few recent ones.

Bounded work: the stage embeds a stable seeded sample of `max_rows` reference and `max_rows`
recent rows, and weights a stable seeded sample of `weight_rows` test rows (the others weigh 0,
and evaluate's weighted slice is the weighted rows), so it never embeds more than
2 x max_rows + weight_rows rows however long the history. With `--cache`, an encoder embeds a
text once across runs (`ratchet.cache.EmbeddingCache`): while the champion stays, a run embeds
the new batch's sampled rows and the few that entered the samples; the report's `embedding`
says how many rows were embedded now and how many came from the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ratchet.config import DriftConfig, Params
from ratchet.data import ID, LABEL, RECENT, REFERENCE, SPLITS, TEXT, write_parquet_atomic
from ratchet.drift import (
    Sample,
    detect,
    effective_sample_size,
    importance_weights,
    should_retrain,
    summary,
)
from ratchet.headline import headline
from ratchet.runtime import read_json, write_json
from ratchet.stage import stage_main


def drift_stats(reference: pd.DataFrame, recent: pd.DataFrame, cfg: DriftConfig,
                ref_emb: np.ndarray | None = None, rec_emb: np.ndarray | None = None) -> dict:
    """The flat report for two frames (embeddings optional): numbers, verdicts and a summary."""
    out, _ = _compare(reference, recent, cfg, ref_emb, rec_emb)
    return out


def _compare(reference: pd.DataFrame, recent: pd.DataFrame, cfg: DriftConfig,
             ref_emb: np.ndarray | None, rec_emb: np.ndarray | None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    if len(reference) == 0 or len(recent) == 0:
        return {"n_reference": len(reference), "n_recent": len(recent), "status": "no_reference",
                "drifted": False, "drifted_by": [],
                "summary": "first batch: nothing to compare"}, {}
    out, arrays = detect(
        Sample(reference[TEXT].astype(str).tolist(), reference[LABEL].astype(str).tolist(),
               ref_emb),
        Sample(recent[TEXT].astype(str).tolist(), recent[LABEL].astype(str).tolist(), rec_emb),
        cfg,
    )
    out["status"] = "compared"
    out["summary"] = summary(out)
    return out, arrays


def _sample(rows: pd.DataFrame, size: int, seed: int) -> np.ndarray:
    """At most `size` row labels of `rows`, seeded, in their original order.

    The rows whose seeded text hashes are smallest: a uniform sample without replacement that
    is stable as the rows grow (a row stays in it until `size` rows hash below it), so a run
    embeds only the few rows that entered, the rest come from the embedding cache.
    """
    picked = rows.index.to_numpy()
    if len(picked) > size:
        salt = f"ratchet-drift-sample-{seed}\x00".encode()
        coins = np.array([int.from_bytes(hashlib.sha256(salt + t.encode("utf-8", "surrogatepass"))
                                         .digest()[:8], "big")
                          for t in rows[TEXT].astype(str)], dtype=np.uint64)
        picked = np.sort(picked[np.argsort(coins, kind="stable")[:size]])
    return picked


def embed_rows(params: Params, champion: dict, texts: list[str], cache: Path | None
               ) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Embeddings of `texts` with the champion's encoder (the base model before one), served
    from the embedding cache where that encoder embedded a text before; the encoder is loaded
    only when some text is new to it.

    Returns the (n, hidden) array, which encoder it is, and how many rows were embedded now.
    """
    from ratchet.cache import EmbeddingCache
    from ratchet.embed import champion_description, embed, encoder_key, load_keyed_encoder

    store = EmbeddingCache(cache)
    key = encoder_key(params, champion)
    description = (champion_description(champion) if champion.get("version")
                   else f"base model `{params.model.source}`")
    loaded: dict[str, Any] = {}

    def compute(batch: list[str]) -> np.ndarray:
        model, tok = loaded["model"], loaded["tok"]
        return embed(batch, model, tok, max_length=params.model.max_length,
                     batch_size=params.drift.batch_size)

    _, missing = store.lookup(key, texts)
    if len(missing) or cache is None:
        model, tok, description, loaded_key = load_keyed_encoder(params, champion, Path.cwd())
        loaded.update(model=model, tok=tok)
        key = loaded_key  # the base model's when the champion could not be loaded
    vectors, embedded = store.embed(key, texts, compute)
    return vectors, description, {"encoder_key": key, "rows": len(texts), "embedded": embedded,
                                  "cached": len(texts) - embedded}


def run(params: Params, *, data: Path, champion: Path, report: Path, plot_path: Path,
        weights: Path, cache: Path | None = None, metrics: Path | None = None
        ) -> dict[str, Any]:
    cfg = params.drift
    frames = {s: pd.read_parquet(data / f"{s}.parquet").assign(split=s) for s in SPLITS}
    rows = pd.concat(frames.values(), ignore_index=True)
    reference, recent = rows[rows["slice"] == REFERENCE], rows[rows["slice"] == RECENT]
    test_rows = rows[rows["split"] == "test"]
    champ = read_json(champion)
    ref_idx = _sample(reference, cfg.max_rows, cfg.seed)
    rec_idx = _sample(recent, cfg.max_rows, cfg.seed)
    # The test rows that get a weight: a bounded, stable sample too (the rest weigh 0).
    test_idx = _sample(test_rows, cfg.weight_rows, cfg.seed + 1)
    prob_test = np.full(len(test_idx), np.nan)
    emb: dict[int, np.ndarray] = {}
    encoder, embedding = None, {"rows": 0, "embedded": 0, "cached": 0}
    if len(ref_idx) >= 2 and len(rec_idx) >= 2:
        need = np.union1d(np.union1d(ref_idx, rec_idx), test_idx)
        vectors, encoder, embedding = embed_rows(
            params, champ, rows.loc[need, TEXT].astype(str).tolist(), cache)
        emb = dict(zip(need.tolist(), vectors, strict=True))
    stats, arrays = _compare(
        reference, recent, cfg,
        np.array([emb[i] for i in ref_idx]) if emb else None,
        np.array([emb[i] for i in rec_idx]) if emb else None,
    )
    if "domain" in arrays and len(test_idx):
        dc = arrays["domain"]
        oof = dict(zip(ref_idx.tolist(), dc.prob_reference, strict=True))
        oof.update(zip(rec_idx.tolist(), dc.prob_recent, strict=True))
        unseen = [i for i in test_idx if i not in oof]
        if unseen:  # test rows outside the classifier's sample: the model refitted on all of it
            oof.update(zip(unseen, dc.model.predict_proba(np.array([emb[i] for i in unseen]))[:, 1],
                           strict=True))
        prob_test = np.array([oof[i] for i in test_idx])
        w = importance_weights(prob_test, n_reference=len(ref_idx), n_recent=len(rec_idx),
                               clip=(cfg.weight_min, cfg.weight_max))
        weighting = "domain classifier (out-of-fold where the row was in its sample)"
    else:  # nothing to weigh by: every test row alike, none of them embedded for it
        test_idx = test_rows.index.to_numpy()
        prob_test = np.full(len(test_idx), np.nan)
        w = np.ones(len(test_idx))
        weighting = "uniform (no reference to compare with)"
    # Back to every test row, in file order: unsampled rows weigh 0 and have no probability.
    position = {label: i for i, label in enumerate(test_rows.index)}
    at = np.array([position[i] for i in test_idx], dtype=np.int64)
    w_all = np.zeros(len(test_rows))
    w_all[at] = w
    prob_all = np.full(len(test_rows), np.nan)
    prob_all[at] = prob_test
    retrain, why = should_retrain(cfg.trigger, drifted=bool(stats["drifted"]),
                                  new_rows=len(recent), has_champion=bool(champ.get("version")))
    stats.update(
        encoder=encoder, alpha=cfg.alpha, retrain=retrain, retrain_reason=why,
        trigger_mode=cfg.trigger.mode, weights_apply_to="rows of the test split, in file order",
        weights_method=weighting, weights_n=len(w), weights_test_rows=len(test_rows),
        weights_sampled=len(w) < len(test_rows),
        weights_min=float(w.min()) if len(w) else None,
        weights_max=float(w.max()) if len(w) else None,
        weights_ess=effective_sample_size(w), embedding=embedding,
    )
    test = frames["test"]
    table = pd.DataFrame({"row": np.arange(len(test)), "text": test[TEXT].astype(str).to_numpy(),
                          "slice": test["slice"].astype(str).to_numpy(),
                          "prob_recent": prob_all, "weight": w_all})
    if ID in test.columns:  # batches may carry their own row ids; keep them as a second key
        table.insert(1, ID, test[ID].to_numpy())
    write_parquet_atomic(table, weights)
    write_json(report, stats)
    if metrics is not None:  # the headline numbers for `dvc metrics show`
        write_json(metrics, headline("drift", stats))
    plot(reference, recent, arrays, stats, plot_path)
    return stats


def plot(reference: pd.DataFrame, recent: pd.DataFrame, arrays: dict[str, Any],
         stats: dict[str, Any], path: Path, top_labels: int = 30) -> None:
    """Four panels: label shares, length histograms, MMD null vs observed, classifier scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (ax_lab, ax_len), (ax_mmd, ax_dom) = axes
    shares = {name: df[LABEL].value_counts(normalize=True) for name, df in
              ((REFERENCE, reference), (RECENT, recent))}
    labels = (shares[REFERENCE].add(shares[RECENT], fill_value=0)
              .sort_values(ascending=False).index[:top_labels].tolist())
    x = np.arange(len(labels))
    for offset, (name, df) in zip((-0.2, 0.2), ((REFERENCE, reference), (RECENT, recent)),
                                  strict=True):
        ax_lab.bar(x + offset, shares[name].reindex(labels, fill_value=0).to_numpy(), width=0.4,
                   label=f"{name} (n={len(df)})")
        lengths = df[TEXT].astype(str).str.split().str.len()
        if len(lengths):
            ax_len.hist(lengths, bins=range(0, int(lengths.max()) + 2), alpha=0.5, density=True,
                        label=name)
    ax_lab.set_xticks(x, labels, rotation=75, ha="right", fontsize=7)
    ax_lab.set_ylabel("share of rows")
    ax_lab.set_title(f"labels (top {len(labels)}): JSD {stats.get('label_jsd', float('nan')):.2f}"
                     f", p={stats.get('label_p', float('nan')):.2g}")
    ax_len.set_xlabel("words per text")
    ax_len.set_title(f"text length: KS {stats.get('length_ks', float('nan')):.2f}, "
                     f"p={stats.get('length_p', float('nan')):.2g}")
    for ax in (ax_lab, ax_len):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    mmd = arrays.get("mmd")
    if mmd is not None:
        ax_mmd.hist(mmd.null, bins=40, color="grey", alpha=0.7, label="permutation null")
        ax_mmd.axvline(mmd.mmd2, color="red", label=f"observed {mmd.mmd2:.3g}")
        ax_mmd.set_title(f"embedding MMD²: p={mmd.p_value:.3g}")
        ax_mmd.set_xlabel("MMD²")
        ax_mmd.legend()
    else:
        ax_mmd.text(0.5, 0.5, "MMD not computed", ha="center", va="center")
        ax_mmd.set_axis_off()
    dom = arrays.get("domain")
    if dom is not None:
        bins = np.linspace(0, 1, 31)
        ax_dom.hist(dom.prob_reference, bins=bins, alpha=0.5, density=True, label=REFERENCE)
        ax_dom.hist(dom.prob_recent, bins=bins, alpha=0.5, density=True, label=RECENT)
        ax_dom.set_xlabel("out-of-fold P(recent | embedding)")
        ax_dom.set_title(f"domain classifier: AUC {dom.auc:.2f}; test weights "
                         f"{stats.get('weights_min', 0):.2f}..{stats.get('weights_max', 0):.2f}")
        ax_dom.legend()
    else:
        ax_dom.text(0.5, 0.5, "domain classifier not computed", ha="center", va="center")
        ax_dom.set_axis_off()
    fig.suptitle(stats.get("summary", ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    stage_main("drift", __doc__, {
        "data": "folder with train/val/test parquet files",
        "champion": "champion.json (resolved `champion` alias): its encoder embeds the texts",
        "report": "drift report JSON to write",
        "metrics": "drift's headline numbers JSON to write (DVC metrics; `ratchet.headline`)",
        "plot_path": "PNG summary plot to write",
        "weights": "importance weights of the test rows (parquet) to write",
        "cache": "folder of the embedding cache (by encoder and text): each encoder embeds a "
                 "text once across runs",
    }, run, optional=("cache", "metrics"))


if __name__ == "__main__":
    main()
