"""The thin `main()` every stage module shares: parse paths, load params, run, report errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ratchet.config import Params, load_params
from ratchet.errors import RatchetError
from ratchet.runtime import setup


def stage_main(name: str, doc: str, paths: dict[str, str], fn: Callable[..., object],
               optional: tuple[str, ...] = ()) -> None:
    """Run `fn(params, **paths)` as `python -m tasks.<name> --<path> ...`.

    Args:
        paths: argument name -> help text; each becomes a required `--name PATH` option.
        optional: the names among `paths` that may be left out (`fn` has a default for them):
            outputs and inputs added in later versions, so that the `dvc.yaml` of a workspace
            made before them still runs.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=doc)
    for arg, help_text in paths.items():
        parser.add_argument(f"--{arg.replace('_', '-')}", dest=arg, type=Path,
                            required=arg not in optional,
                            help=help_text + (" (optional)" if arg in optional else ""))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    ns = {k: v for k, v in vars(parser.parse_args()).items() if v is not None}
    setup()
    try:
        params: Params = load_params(ns.pop("params"))
        fn(params, **ns)
    except RatchetError as err:
        print(f"ratchet {name}: {err}", file=sys.stderr)
        sys.exit(1)
