"""The MLflow pyfunc every registered model is: text in, label and probabilities out.

Served with `mlflow models serve -m models:/<name>@champion --env-manager local` (the class
lives in ratchet, so the serving environment must have it installed), it answers
`/invocations` for a `text` column (`dataframe_split`, `dataframe_records`) or a list of strings
(`{"inputs": ["...", ...]}`) with one `label`, `score` and `probabilities` per row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_ARTIFACT = "model_dir"
TEXT = "text"
_SHOWN = 5  # how many offending rows an error message names


def signature():
    """Input: a `text` column. Output: `label`, its `score`, and every class's probability."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, TEXT)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "score"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
    )


def bad_input(message: str) -> Exception:
    """An error the scoring server answers with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    return MlflowException(message, error_code=BAD_REQUEST)


def _values(model_input: Any) -> list[Any]:
    """The raw `text` values of a DataFrame, a mapping of columns, a sequence or one string."""
    if isinstance(model_input, pd.DataFrame | Mapping):
        columns = list(model_input.columns if isinstance(model_input, pd.DataFrame)
                       else model_input.keys())
        if TEXT not in columns:
            raise bad_input(f"input needs a `{TEXT}` column; got columns {columns}")
        column = model_input[TEXT]
        return [column] if isinstance(column, str) else list(column)
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, np.ndarray):
        return list(model_input.ravel())  # e.g. an (n, 1) array of strings
    if isinstance(model_input, pd.Series | list | tuple):
        return list(model_input)
    raise bad_input(
        f"unsupported input type `{type(model_input).__name__}`: send a `{TEXT}` column "
        "or a list of strings"
    )


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def to_texts(model_input: Any) -> list[str]:
    """The texts to classify; a 400-style error names rows that are null or not scalars."""
    values = _values(model_input)
    missing = [i for i, v in enumerate(values) if _is_missing(v)]
    if missing:
        raise bad_input(f"`{TEXT}` is null in row(s) {missing[:_SHOWN]}: every row needs a string")
    nested = [i for i, v in enumerate(values)
              if isinstance(v, list | tuple | np.ndarray | Mapping)]
    if nested:
        raise bad_input(f"`{TEXT}` must be one string per row; row(s) {nested[:_SHOWN]} hold "
                        "lists or objects")
    return [str(v) for v in values]


class TextClassifier(mlflow.pyfunc.PythonModel):
    """Serves a Hugging Face sequence-classification directory (safetensors, tokenizer, labels)."""

    def load_context(self, context: Any) -> None:
        from ratchet.models import Classifier

        self._clf = Classifier(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        """One row per text. MLflow hands a DataFrame; direct callers may pass a list of str."""
        labels, probs = self._clf.predict(to_texts(model_input))
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

    @property
    def classifier(self):
        """The ratchet.models.Classifier behind this model (what evaluate times and perturbs)."""
        return self._clf
