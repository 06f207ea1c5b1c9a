"""Process set-up done explicitly (never on import): telemetry off, offline hub, quiet logs."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}
# Defaults that keep a busy 2-core machine working: Prefect gives its ephemeral server 20 s to
# start, which a loaded laptop (or a training run beside it) can exceed. Users may override.
DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def setup(level: int = logging.WARNING) -> None:
    """Turn telemetry off and keep third-party logs quiet; call from entry points only."""
    for key, value in {**TELEMETRY_OFF, **DEFAULTS}.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "great_expectations", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temp file normal permissions (mkstemp makes it 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` only if the block ends
    without an error, removed otherwise: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text_atomic(path: Path, text: str) -> None:
    """Write text atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_yaml_mapping(path: Path, shape: str) -> dict:
    """A small YAML file that must hold a mapping (empty file: {}); `shape` says what it maps,
    for the error (e.g. "each label to a list of texts"). Bad YAML or another shape fails with
    one line naming the file."""
    import yaml

    from ratchet.errors import ConfigError

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must map {shape}, got {type(raw).__name__}")
    return raw
