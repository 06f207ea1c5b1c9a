"""augment: seeded, label-preserving copies of the training split, with their provenance.

Operations (drawn at random for each copy): `synonym` and `insert` use the nearest neighbours
of a word in the model's own word-embedding table (no downloaded thesaurus), `swap` and `delete`
move or drop words, and `contextual` lets the MLM from `pretrain` fill a masked word, when that
MLM is good enough to be trusted. Smaller classes get more copies when `balance` is on.

A copy can reproduce a val or test text (a swap that restores another row's order, a deletion,
a synonym): such copies are dropped and counted (`leak/dropped`), by the same text key that
dedup and the splits use, so no text the models are judged on is trained on.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import AugmentConfig, Params
from ratchet.data import LABEL, TEXT, text_key, write_parquet_atomic
from ratchet.headline import FULL_HELP, write_metrics
from ratchet.stage import stage_main

WORD = re.compile(r"[a-z]{3,}")
LEXICAL_OPS = {"synonym", "insert"}


class Lexicon:
    """Nearest neighbours of whole lower-case words in a word-embedding table (cosine)."""

    def __init__(self, vocab: dict[str, int], embeddings: np.ndarray, *, k: int,
                 min_similarity: float):
        words = sorted(w for w in vocab if WORD.fullmatch(w))
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        table = embeddings[[vocab[w] for w in words]].astype(np.float32)
        self.table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        self.k, self.min_similarity = k, min_similarity
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_model_dir(cls, model_dir: Path, *, k: int, min_similarity: float) -> Lexicon:
        """Read the vocabulary and the input-embedding table straight from the files (no torch)."""
        from safetensors import safe_open
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab()
        with safe_open(str(model_dir / "model.safetensors"), "np") as f:
            names = f.keys()  # a safetensors handle is not iterable itself
            keys = [key for key in names if key.endswith("word_embeddings.weight")]
            if not keys:
                raise ValueError(f"{model_dir}: no word_embeddings.weight in model.safetensors")
            table = f.get_tensor(keys[0])
        return cls(vocab, table, k=k, min_similarity=min_similarity)

    def prime(self, words: set[str]) -> None:
        """Neighbours for many words in one matrix product (the per-word path is the same)."""
        todo = sorted(w for w in words if w in self.index and w not in self._cache)
        for start in range(0, len(todo), 512):
            chunk = todo[start : start + 512]
            sims = self.table[[self.index[w] for w in chunk]] @ self.table.T
            for w, row in zip(chunk, sims, strict=True):
                self._cache[w] = self._pick(w, row)

    def neighbours(self, word: str) -> list[str]:
        if word not in self._cache:
            if word not in self.index:
                return []
            self._cache[word] = self._pick(word, self.table @ self.table[self.index[word]])
        return self._cache[word]

    def _pick(self, word: str, sims: np.ndarray) -> list[str]:
        top = np.argpartition(-sims, min(self.k + 1, len(sims) - 1))[: self.k + 1]
        top = top[np.argsort(-sims[top], kind="stable")]
        return [self.words[i] for i in top
                if self.words[i] != word and sims[i] >= self.min_similarity][: self.k]


def _positions(words: list[str], lexicon: Lexicon | None = None) -> list[int]:
    """Word positions an op may change: alphabetic words (with neighbours, given a lexicon)."""
    return [i for i, w in enumerate(words)
            if WORD.fullmatch(w) and (lexicon is None or lexicon.neighbours(w))]


def perturb(text: str, op: str, prob: float, rng: random.Random,
            lexicon: Lexicon | None = None) -> str:
    """One operation over a text's words; returns the text unchanged when the op cannot apply."""
    words = text.split()
    n = max(1, round(prob * len(words)))
    if op == "swap":
        if len(words) < 3:
            return text
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        if len(words) < 3:
            return text
        for _ in range(min(n, len(words) - 2)):
            words.pop(rng.randrange(len(words)))
    elif op in LEXICAL_OPS:
        if lexicon is None:
            raise ValueError(f"op {op!r} needs a lexicon")
        lowered = [w.lower() for w in words]
        spots = _positions(lowered, lexicon)
        if not spots:
            return text
        for i in rng.sample(spots, min(n, len(spots))):
            choice = rng.choice(lexicon.neighbours(lowered[i]))
            if op == "synonym":
                words[i] = choice
            else:
                words.insert(rng.randrange(len(words) + 1), choice)
    else:
        raise ValueError(f"unknown augmentation op {op!r}")
    return " ".join(words)


@dataclass
class MaskedLM:
    """Fills one masked word per text with the pretrained MLM's likely whole words."""

    model_dir: Path
    top_k: int = 5
    batch_size: int = 64
    _parts: tuple = field(default=(), repr=False)

    def _load(self) -> tuple:
        if not self._parts:
            import torch
            from transformers import AutoModelForMaskedLM, AutoTokenizer

            from ratchet.models import set_threads

            set_threads()
            tok = AutoTokenizer.from_pretrained(self.model_dir)
            model = AutoModelForMaskedLM.from_pretrained(self.model_dir).eval()
            vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
            allowed = torch.tensor([bool(WORD.fullmatch(t)) for t in vocab])
            self._parts = (torch, tok, model, vocab, allowed)
        return self._parts

    def fill(self, masked: list[str]) -> list[list[str]]:
        """Candidate words for the mask token in each text (the mask written as `[MASK]`)."""
        torch, tok, model, vocab, allowed = self._load()
        texts = [t.replace("[MASK]", tok.mask_token) for t in masked]
        out: list[list[str]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = tok(texts[start : start + self.batch_size], padding=True, truncation=True,
                          max_length=128, return_tensors="pt")
                logits = model(**enc).logits
                for row, ids in enumerate(enc["input_ids"]):
                    where = (ids == tok.mask_token_id).nonzero()
                    if len(where) == 0:  # the mask was truncated away
                        out.append([])
                        continue
                    scores = logits[row, int(where[0])].masked_fill(~allowed, float("-inf"))
                    out.append([vocab[i] for i in scores.topk(self.top_k).indices.tolist()])
        return out


def copies_per_label(labels: pd.Series, cfg: AugmentConfig) -> dict[str, int]:
    """Copies per row of each class: `copies`, raised for small classes when balancing."""
    counts = labels.value_counts()
    if counts.empty:
        return {}
    if not cfg.balance or cfg.copies == 0:
        return {str(lab): cfg.copies for lab in counts.index}
    # copies * largest / n copies per row give every class about copies * largest new rows.
    largest = int(counts.max())
    return {str(lab): min(cfg.max_copies, max(cfg.copies, round(cfg.copies * largest / n)))
            for lab, n in counts.items()}


def augment_frame(train: pd.DataFrame, cfg: AugmentConfig, lexicon: Lexicon | None = None,
                  mlm: MaskedLM | None = None) -> pd.DataFrame:
    """Originals plus augmented rows; `augmented_from` names the source text (None: original).

    Ops that need a lexicon or an MLM are left out when none is given. Every draw comes from one
    seeded generator in row order, so the output is a function of the inputs and the seed.
    """
    rng = random.Random(cfg.seed)
    out = train.assign(augmented_from=pd.Series([None] * len(train), dtype="string",
                                                index=train.index))
    ops = [op for op in cfg.ops
           if (op not in LEXICAL_OPS or lexicon is not None) and (op != "contextual" or mlm)]
    if not cfg.enabled or not ops or train.empty:
        return out
    if lexicon is not None:
        lexicon.prime({w.lower() for t in train[TEXT] for w in t.split()})
    per_label = copies_per_label(train[LABEL], cfg)
    extra: list[dict] = []
    contextual: list[tuple[int, list[str], int]] = []  # (row in extra, words, masked position)
    for row in train.itertuples(index=False):
        seen = {row.text}
        for _ in range(per_label.get(str(getattr(row, LABEL)), 0)):
            op = rng.choice(ops)
            if op == "contextual":
                words = row.text.split()
                spots = _positions([w.lower() for w in words])
                if spots:
                    contextual.append((len(extra), words, rng.choice(spots)))
                    extra.append({**row._asdict(), "augmented_from": row.text,
                                  "_rng": rng.random()})
                continue
            new = perturb(row.text, op, cfg.prob, rng, lexicon)
            if new not in seen:
                seen.add(new)
                extra.append({**row._asdict(), TEXT: new, "augmented_from": row.text})
    if contextual and mlm is not None:
        masked = [" ".join(words[:i] + ["[MASK]"] + words[i + 1 :]) for _, words, i in contextual]
        for (slot, words, i), cands in zip(contextual, mlm.fill(masked), strict=True):
            cands = [c for c in cands if c != words[i].lower()]
            if cands:
                pick = cands[int(extra[slot]["_rng"] * len(cands))]
                extra[slot][TEXT] = " ".join(words[:i] + [pick] + words[i + 1 :])
            else:
                extra[slot][TEXT] = None
    extra = [{k: v for k, v in r.items() if k != "_rng"} for r in extra
             if r.get(TEXT) is not None and r[TEXT] != r["augmented_from"]]
    if extra:
        added = pd.DataFrame(extra).drop_duplicates(subset=[TEXT, "augmented_from"])
        out = pd.concat([out, added.astype({"augmented_from": "string"})], ignore_index=True)
    return out


def drop_leaks(aug: pd.DataFrame, held_out: set[str], key: int) -> tuple[pd.DataFrame, int]:
    """Leave out augmented rows whose text key is among `held_out` (the val and test keys);
    returns the rest and how many left. Originals are prepare's business and stay."""
    leak = aug["augmented_from"].notna().to_numpy() & np.array(
        [text_key(t, key) in held_out for t in aug[TEXT]], dtype=bool)
    return aug[~leak].reset_index(drop=True), int(leak.sum())


def held_out_keys(paths: list[Path], key: int) -> set[str]:
    """The text keys of the val and test splits."""
    keys: set[str] = set()
    for path in paths:
        keys.update(text_key(t, key) for t in pd.read_parquet(path, columns=[TEXT])[TEXT])
    return keys


def contextual_ready(pretrain_metrics: Path, cfg: AugmentConfig) -> tuple[bool, str]:
    """Whether the pretrained MLM may propose words: it trained, and perplexity is low enough."""
    if "contextual" not in cfg.ops:
        return False, "not among augment.ops"
    stats = json.loads(pretrain_metrics.read_text()) if pretrain_metrics.exists() else {}
    ppl = stats.get("perplexity_after", float("nan"))
    if not stats.get("steps"):
        return False, "pretrain did not train the MLM"
    if not ppl <= cfg.contextual_max_perplexity:
        return False, (f"MLM perplexity {ppl:.1f} > augment.contextual_max_perplexity "
                       f"{cfg.contextual_max_perplexity:g}")
    return True, f"MLM perplexity {ppl:.1f}"


def run(params: Params, *, train: Path, pretrained: Path, pretrain_metrics: Path, out: Path,
        metrics: Path, val: Path | None = None, test: Path | None = None,
        all_metrics: Path | None = None) -> dict:
    cfg = params.augment
    base = pd.read_parquet(train)
    lexicon = mlm = None
    if cfg.enabled and LEXICAL_OPS & set(cfg.ops):
        lexicon = Lexicon.from_model_dir(pretrained, k=cfg.neighbours,
                                         min_similarity=cfg.min_similarity)
    use_mlm, why = contextual_ready(pretrain_metrics, cfg)
    if cfg.enabled and use_mlm:
        mlm = MaskedLM(pretrained)
    elif cfg.enabled and "contextual" in cfg.ops:
        print(f"augment: contextual substitution skipped: {why}")
    aug = augment_frame(base, cfg, lexicon, mlm)
    held = [p for p in (val, test) if p is not None]
    if not held:  # a dvc.yaml made before the check: say so rather than pass in silence
        print("augment: no --val/--test given, augmented rows are not checked against them; "
              "copy the augment stage of ratchet's dvc.yaml into this workspace's")
    aug, leaked = drop_leaks(aug, held_out_keys(held, params.prepare.split_key),
                             params.prepare.split_key)
    write_parquet_atomic(aug, out)
    added = aug[aug["augmented_from"].notna()]
    stats: dict = {"rows_original": len(base), "rows_augmented": len(added),
                   "contextual_used": int(mlm is not None), "leak/checked": int(bool(held)),
                   "leak/dropped": leaked}
    for label, n in copies_per_label(base[LABEL], cfg).items():
        stats[f"copies/{label}"] = n
    write_metrics("augment", stats, metrics, all_metrics)
    return stats


def main() -> None:
    stage_main("augment", __doc__.split("\n")[0], {
        "train": "prepared train split (parquet); only training rows are augmented",
        "val": "prepared val split (parquet): no augmented row may repeat one of its texts",
        "test": "prepared test split (parquet): no augmented row may repeat one of its texts",
        "pretrained": "model folder from pretrain (word embeddings, MLM)",
        "pretrain_metrics": "pretrain metrics JSON (is the MLM good enough?)",
        "out": "augmented train parquet to write",
        "metrics": "augment metrics JSON to write",
        "all_metrics": FULL_HELP,
    }, run, optional=("val", "test", "all_metrics"))


if __name__ == "__main__":
    main()
