"""Wheels for bench/gpu.sh on a GPU host that has PyTorch but can't reach a package index.

    .venv/bin/python -m bench.wheelhouse var/wheelhouse --python-version 3.12   # where pip works
    bench/gpu.sh --wheelhouse var/wheelhouse                                    # on the GPU host

    # the host's own numpy and pillow will do: a smaller folder to copy there
    .venv/bin/python -m bench.wheelhouse var/wheelhouse --python-version 3.12 \
        --leave-out numpy,pillow

GPU machines often come with a CUDA build of PyTorch and little else, and rented or air-gapped
ones can't download the rest. The wheelhouse holds the project's runtime dependencies and theirs
at the versions installed here (the ones the tests ran against), for the host's Python and
platform, leaving out what the GPU run never imports (Ray and Celery: its service step runs the
request flow in one process) and what the host's PyTorch brings (torch and its own dependencies).
bench/gpu.sh installs it into a folder of its own and puts that first on the path: nothing on the
host changes. Gathering into a folder again downloads only what changed, and removes the wheels
no longer wanted (two versions of one package would stop the install).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

NOT_IMPORTED = ("ray", "celery", "tornado")
"""Runtime dependencies that only the Ray deployments and the job queue import."""
BENCH_IMPORTS = ("uvicorn",)
"""What the GPU run imports itself beyond the project's dependencies (Ray Serve brings uvicorn to
the service; the run serves the app with it directly)."""
HOST_PROVIDES = "torch"
"""The one the host brings, in its own (CUDA) build; its dependencies come with it."""
# Wheels most x86-64 Linux distributions of the last years can load, newest first.
MANYLINUX_X86_64 = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The project's runtime dependencies, as pyproject.toml declares them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(roots: Iterable[Requirement]) -> set[NormalizedName]:
    """The installed distributions that ``roots`` need here, their needs included (extras
    followed; requirements whose markers don't hold on this Python left out)."""
    found: set[NormalizedName] = set()
    followed: set[tuple[NormalizedName, frozenset[str]]] = set()
    pending = [root for root in roots if _holds(root.marker, set())]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        # A distribution reached again with other extras needs theirs too.
        if (name, frozenset(requirement.extras)) in followed:
            continue
        followed.add((name, frozenset(requirement.extras)))
        found.add(name)
        for text in metadata.distribution(name).requires or []:
            needed = Requirement(text)
            if _holds(needed.marker, requirement.extras):
                pending.append(needed)
    return found


def _holds(marker: Marker | None, extras: set[str]) -> bool:
    """Whether a requirement under ``marker`` applies here, to a dependent that asked for
    ``extras``."""
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras))


def gpu_run_distributions() -> set[NormalizedName]:
    """What bench/gpu.sh needs on a host that has PyTorch: the project's runtime dependencies
    and its own, with theirs, less what it never imports and what PyTorch brings. Markers are
    read for this Python: a host's newer Python may get a wheel it does not need, never miss
    one, unless a dependency needs something only on newer Pythons."""
    wanted = [
        requirement
        for requirement in project_requirements()
        if canonicalize_name(requirement.name) not in NOT_IMPORTED
    ] + [Requirement(name) for name in BENCH_IMPORTS]
    return closure(wanted) - closure([Requirement(HOST_PROVIDES)])


def pins(names: Iterable[str]) -> list[str]:
    """``name==version`` for each, at the version installed here."""
    return sorted(f"{name}=={metadata.version(name)}" for name in names)


def download_command(
    folder: Path, python_version: str, platforms: Sequence[str], wanted: Sequence[str]
) -> list[str]:
    """pip downloading exactly the ``wanted`` pins as binary wheels for the host."""
    platform_options = [option for tag in platforms for option in ("--platform", tag)]
    return [
        sys.executable,
        *("-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"),
        *("--python-version", python_version, "--implementation", "cp", *platform_options),
        *("--dest", str(folder), *wanted),
    ]


def remove_unwanted(folder: Path, wanted: Sequence[str]) -> list[Path]:
    """Delete the wheels in ``folder`` that are not of the ``wanted`` pins; the ones deleted."""
    pinned = (pin.split("==") for pin in wanted)
    keep = {(canonicalize_name(name), Version(version)) for name, version in pinned}
    removed = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if (name, version) not in keep:
            wheel.unlink()
            removed.append(wheel)
    return removed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.wheelhouse", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("folder", type=Path, help="where the wheels go")
    parser.add_argument(
        "--python-version",
        default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="the GPU host's Python, e.g. 3.12 (default: this one's)",
    )
    parser.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        default=None,
        help="a wheel platform tag the host loads, once per tag (default: manylinux x86-64)",
    )
    parser.add_argument(
        "--leave-out",
        type=lambda text: {canonicalize_name(name) for name in text.split(",") if name},
        default=set(),
        help="distributions the host already has, comma-separated (its own versions are used)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Download the wheels; pip's exit status."""
    args = parse_args(argv)
    needed = gpu_run_distributions()
    unknown = args.leave_out - needed
    if unknown:
        print(f"not among the GPU run's needs: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    wanted = pins(needed - args.leave_out)
    args.folder.mkdir(parents=True, exist_ok=True)
    command = download_command(
        args.folder, args.python_version, args.platforms or MANYLINUX_X86_64, wanted
    )
    print(f"{len(wanted)} wheels for Python {args.python_version}: {' '.join(wanted)}")
    downloaded = subprocess.run(command, check=False).returncode
    for wheel in remove_unwanted(args.folder, wanted):
        print(f"removed {wheel.name}: no longer wanted")
    return downloaded


if __name__ == "__main__":
    sys.exit(main())
