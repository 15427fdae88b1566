"""The ``flux-serve`` command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from serve_app.settings import get_settings
from serve_app.tiny_models import TINY_CLIP_NAME, TINY_FLUX_NAME, ensure_tiny_model


def build_tiny_models(cache_dir: Path) -> None:
    """Build the embedded tiny FLUX and CLIP into ``cache_dir`` (kept if already there)."""
    for name in (TINY_FLUX_NAME, TINY_CLIP_NAME):
        print(ensure_tiny_model(name, cache_dir))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="flux-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build-tiny-models", help="Build the embedded tiny FLUX and CLIP models and print where."
    )
    build.add_argument(
        "cache_dir",
        nargs="?",
        type=Path,
        help="Folder to build into (default: FLUX_SERVE_CACHE_DIR, ~/.cache/flux-serve).",
    )
    arguments = parser.parse_args(argv)
    if arguments.command == "build-tiny-models":
        build_tiny_models(arguments.cache_dir or get_settings().cache_dir)


if __name__ == "__main__":
    main()
