"""Sentence embeddings for drift: mean-pooled last hidden states of an encoder, batched.

The encoder is the champion's (what serves now defines the space drift is measured in) or,
before any champion exists, the base model of `model.source`. Nothing is fetched from a hub.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ratchet.models import TINY, load_tokenizer, set_threads, source_dir, tiny_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ratchet.config import Params


def load_base_encoder(source: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `model.source` without a head (`tiny` is built seeded from a config)."""
    import torch
    from transformers import AutoModel, BertModel
    from transformers.utils import logging as hf_logging

    tok = load_tokenizer(source)
    path = source_dir(source)
    if source == TINY or path is None:
        torch.manual_seed(seed)
        return BertModel(tiny_config(len(tok)), add_pooling_layer=False), tok
    hf_logging.set_verbosity_error()  # a pooler absent from the checkpoint is expected
    return AutoModel.from_pretrained(path), tok


def load_dir_encoder(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The encoder inside a saved sequence-classification directory (its head is dropped)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the classifier head's weights are unused here, as intended
    return AutoModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def champion_model_dir(params: Params, champion: dict, workspace: Path, dest: Path) -> Path:
    """Download the registered champion's artifacts and return its Hugging Face directory.

    The registered model is a pyfunc whose `model_dir` artifact is the HF directory; reading
    the MLmodel file finds it rather than assuming the layout.
    """
    import mlflow.artifacts
    from mlflow.models import Model

    from ratchet.pyfunc import MODEL_ARTIFACT
    from ratchet.registry import connect

    connect(params.registry, workspace)
    uri = f"models:/{champion['name']}/{champion['version']}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    rel = flavor.get("artifacts", {}).get(MODEL_ARTIFACT, {}).get("path")
    if not rel or not (local / rel / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: no `{MODEL_ARTIFACT}` Hugging Face directory in the "
                                "registered model's artifacts")
    return local / rel


def load_encoder(params: Params, champion: dict, workspace: Path
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The champion's encoder when champion.json names one, else the base model.

    Returns the model, its tokenizer and a description of which encoder it is (for the report).
    A champion that cannot be loaded falls back to the base model, and the description says so:
    drift is still measured consistently, because both samples go through the same encoder.
    """
    model, tok, description, _ = load_keyed_encoder(params, champion, workspace)
    return model, tok, description


def load_keyed_encoder(params: Params, champion: dict, workspace: Path
                       ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, str]:
    """`load_encoder`, and the cache key (`encoder_key`) of the encoder it actually loaded."""
    base = f"base model `{params.model.source}`"
    if champion.get("version"):
        try:
            # The weights are read into memory, so the downloaded copy can go right away.
            with tempfile.TemporaryDirectory(prefix="ratchet-champion-") as tmp:
                model, tok = load_dir_encoder(
                    champion_model_dir(params, champion, workspace, Path(tmp))
                )
            return (model, tok, champion_description(champion),
                    encoder_key(params, champion))
        except Exception as err:  # noqa: BLE001 - any failure falls back, and is recorded
            model, tok = load_base_encoder(params.model.source, params.model.seed)
            return (model, tok, f"{base} (champion v{champion['version']} not loadable: {err})",
                    encoder_key(params, {}))
    model, tok = load_base_encoder(params.model.source, params.model.seed)
    return model, tok, base, encoder_key(params, {})


def champion_description(champion: dict) -> str:
    return f"champion {champion['name']} v{champion['version']}"


def encoder_key(params: Params, champion: dict) -> str:
    """What identifies the embeddings an encoder gives (the embedding cache's model key).

    The champion's: its fingerprint (the hash of its weights; without one, its name and
    version). The base model's: `tiny` with its seed and the torch version that initialised it,
    or the hash of the source directory's weights. Both with `model.max_length`, which
    truncates the texts.
    """
    length = f"L{params.model.max_length}"
    if champion.get("version"):
        fp = champion.get("fingerprint") or f"{champion.get('name')}-v{champion['version']}"
        return f"champion-{fp}-{length}"
    source = params.model.source
    path = source_dir(source)
    if source == TINY or path is None:
        import torch

        version = str(torch.__version__).replace("+", "_")
        return f"tiny-s{params.model.seed}-torch{version}-{length}"
    return f"base-{_weights_hash(path)}-{length}"


def _weights_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir()
                   if p.suffix in {".safetensors", ".bin"} or p.name == "config.json")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def embed(
    texts: Sequence[str],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    batch_size: int = 64,
    progress: bool | None = None,
) -> np.ndarray:
    """Mean of the last hidden state over real (non-padding) tokens: an (n, hidden) array.

    Texts are sorted by length so batches carry little padding; rows come back in input order.
    A progress bar shows on a terminal for long inputs (`progress=None`: when there are more
    than 20 batches).
    """
    import torch
    from tqdm.auto import tqdm

    set_threads()
    model = model.eval()
    hidden = int(model.config.hidden_size)
    out = np.zeros((len(texts), hidden), dtype=np.float32)
    if not len(texts):
        return out
    order = np.argsort([len(t) for t in texts], kind="stable")
    starts = range(0, len(texts), batch_size)
    show = progress if progress is not None else len(starts) > 20
    with torch.inference_mode():
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show,
                          file=sys.stderr):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
            states = model(input_ids=enc["input_ids"],
                           attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            out[idx] = pooled.float().numpy()
    return out
