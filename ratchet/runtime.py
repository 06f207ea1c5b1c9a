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


LOGS = Path(".ratchet/logs")
DEBUG_ENV = "RATCHET_DEBUG"  # "1": failures print their traceback (`ratchet --debug` sets it)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV) == "1"


def log_file(ws: Path | None, what: str) -> Path:
    """A new log file for one command or stage: under the workspace's `.ratchet/logs/` (git
    ignores `.ratchet/`), or a `ratchet-logs` folder in the temp dir when there is no workspace."""
    import time

    if ws is not None and (ws / "params.yaml").is_file():
        folder = ws / LOGS
    else:
        folder = Path(tempfile.gettempdir()) / "ratchet-logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{what}-{os.getpid()}.log"


def one_line(err: BaseException, limit: int = 500) -> str:
    """`<type>: <message>` of an unexpected exception, whitespace folded onto one line."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temp file normal permissions (mkstemp makes it 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


# Below this many free bytes a write error that does not say why (torch's and safetensors'
# C++ streams report a full disk as `basic_ios::clear: iostream error`) is taken for a full disk.
FULL_BELOW = 1 << 20


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding `path` (its
    nearest existing ancestor); None when that cannot be told."""
    path = Path(path).absolute()
    for where in (path, *path.parents):
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def size_text(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full(err: BaseException, path: Path):
    """The `DiskFull` error that `err` (raised writing `path`) stands for, or None: an OSError
    with errno ENOSPC (or EDQUOT), or a RuntimeError from a C++ writer (torch.save, safetensors)
    while the file system holding `path` has (almost) no space left. Call it before the partial
    file is removed: removing it frees the space that tells."""
    import errno

    from ratchet.errors import DiskFull

    if isinstance(err, DiskFull):
        return err
    free = free_bytes(path)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(str(path), size_text(free))
    # torch.save fails with `basic_ios::clear: iostream error`, then, closing the archive, with
    # `[enforce fail at inline_container.cc] unexpected pos`: neither names the cause.
    # safetensors' SafetensorError (an Exception) names it: "No space left on device (os error
    # 28)".
    text = str(err).lower()
    if "no space left on device" in text or "os error 28" in text:
        return DiskFull(str(path), size_text(free))
    if isinstance(err, RuntimeError | OSError) and free is not None and free < FULL_BELOW:
        return DiskFull(str(path), size_text(free))
    return None


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report a full disk met in the block as one `DiskFull` error naming `path`."""
    try:
        yield
    except Exception as err:
        full = disk_full(err, path)
        if full is None or full is err:
            raise
        raise full from err


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` only if the block ends
    without an error, removed otherwise: readers never see a half-written file. A full disk
    fails as one `DiskFull` error naming `path`, with the temporary file gone."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException as err:
        full = disk_full(err, path) if isinstance(err, Exception) else None
        Path(tmp).unlink(missing_ok=True)
        if full is not None and full is not err:
            raise full from err
        raise


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """`atomic_path` for a directory (a saved model): a fresh temporary directory beside `path`,
    put in its place only if the block ends without an error, removed otherwise."""
    import shutil

    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        with writing(path):
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
    except BaseException as err:
        full = disk_full(err, path) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None and full is not err:
            raise full from err
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
