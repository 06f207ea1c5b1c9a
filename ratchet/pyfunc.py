"""The MLflow pyfunc every registered model is: text in, label and probabilities out."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model_dir"


def signature():
    """Input: a `text` column. Output: `label`, its `score`, and every class's probability."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "text")]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "score"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
    )


class TextClassifier(mlflow.pyfunc.PythonModel):
    """Serves a Hugging Face sequence-classification directory (safetensors, tokenizer, labels)."""

    def load_context(self, context: Any) -> None:
        from ratchet.models import Classifier

        self._clf = Classifier(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError("input needs a `text` column")
            texts = model_input["text"].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        labels, probs = self._clf.predict(texts)
        return pd.DataFrame(
            {
                "label": labels,
                "score": probs.max(axis=1).astype(float),
                "probabilities": [list(map(float, row)) for row in probs],
            }
        )

    @property
    def labels(self) -> list[str]:
        return self._clf.labels
