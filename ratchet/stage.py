"""The thin `main()` every stage module shares: parse paths, load params, run, report errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ratchet.config import Params, load_params
from ratchet.errors import RatchetError
from ratchet.runtime import setup


def stage_main(name: str, doc: str, paths: dict[str, str], fn: Callable[..., object]) -> None:
    """Run `fn(params, **paths)` as `python -m tasks.<name> --<path> ...`.

    Args:
        paths: argument name -> help text; each becomes a required `--name PATH` option.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=doc)
    for arg, help_text in paths.items():
        parser.add_argument(f"--{arg.replace('_', '-')}", dest=arg, type=Path, required=True,
                            help=help_text)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    ns = vars(parser.parse_args())
    setup()
    try:
        params: Params = load_params(ns.pop("params"))
        fn(params, **ns)
    except RatchetError as err:
        print(f"ratchet {name}: {err}", file=sys.stderr)
        sys.exit(1)
