"""bench/gpu.sh as a GPU host runs it, reduced to a CPU's size (FLUX.1-schnell's widths at reduced
depth, 64x64, one step, one image per figure, no compiling; tests/test_speedups.py compiles):
with the project's environment, and from a wheelhouse on a host that has PyTorch and nothing
else of ours."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bench import wheelhouse

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE_VARIABLE = "FLUX_SERVE_TEST_WHEELHOUSE"
REDUCED = [
    *("--size", "64", "--steps", "1", "--batch-size", "1", "--images", "1"),
    *("--requests", "1", "--repeats", "1", "--compile-mode", "off"),
]


def run_gpu_sh(report: Path, *options: str, env: dict[str, str] | None = None) -> str:
    """Run bench/gpu.sh reduced, with ``env`` on top of this environment, and return its report
    after checking that it ran every step."""
    command = [str(ROOT / "bench" / "gpu.sh"), *REDUCED, *options, "--out", str(report)]
    finished = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    text = report.read_text()
    assert "preset full (reduced)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "as built, float32" in rows["1"]
    assert "fused QKV, channels-last VAE" in rows["2"]
    assert "step 2 + int8_weight_only" in rows["3"]
    assert "1 requests of 1 images" in rows["4"]
    assert "step 3 with int8_weight_only: fp8 needs a GPU" in text
    assert "skipped" not in text
    assert "ended after" in text
    return text


def test_gpu_sh_runs_every_step_on_the_reduced_full_preset_on_a_cpu(tmp_path: Path) -> None:
    run_gpu_sh(tmp_path / "gpu.md")


def test_the_wheelhouse_takes_the_projects_dependencies_less_ray_celery_and_what_torch_brings() -> (
    None
):
    needed = wheelhouse.gpu_run_distributions()
    assert {"diffusers", "transformers", "torchao", "fastapi", "pydantic-core", "boto3"} <= needed
    assert "uvicorn" in needed  # the run serves the app with it; Ray Serve brings it otherwise
    assert "botocore" in needed  # a dependency's dependency
    assert not {"ray", "celery", "torch", "sympy", "networkx", "flux-serve"} & needed
    for pin in wheelhouse.pins(needed):
        name, version = pin.split("==")
        assert metadata.version(name) == version


def test_closure_follows_extras_and_skips_what_markers_rule_out() -> None:
    # ray[serve] brings uvicorn only through its "serve" extra.
    assert "uvicorn" in wheelhouse.closure([Requirement("ray[serve]")])
    assert "uvicorn" not in wheelhouse.closure([Requirement("ray")])
    assert not wheelhouse.closure([Requirement('ray; python_version < "3"')])
    # Reached first without its extra (the last root is followed first), then with it.
    plain_then_standard = [Requirement("uvicorn[standard]"), Requirement("uvicorn")]
    assert "httptools" in wheelhouse.closure(plain_then_standard)
    assert "httptools" not in wheelhouse.closure([Requirement("uvicorn")])


def test_the_wheelhouse_refuses_to_leave_out_what_it_would_not_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert wheelhouse.main([str(tmp_path), "--leave-out", "numpy,ray"]) == 2
    assert "not among the GPU run's needs: ray" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_gathering_again_removes_the_wheels_no_longer_wanted(tmp_path: Path) -> None:
    for name in ("numpy-1.0.0-py3-none-any.whl", "numpy-2.0.0-py3-none-any.whl", "notes.txt"):
        (tmp_path / name).write_text("")
    removed = wheelhouse.remove_unwanted(tmp_path, ["numpy==2.0", "pillow==13.0.0"])
    assert [wheel.name for wheel in removed] == ["numpy-1.0.0-py3-none-any.whl"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "notes.txt",
        "numpy-2.0.0-py3-none-any.whl",
    ]


def torch_only_python(folder: Path) -> Path:
    """A Python with this one's PyTorch (and what PyTorch needs) and nothing else installed."""
    host = folder / "host-packages"
    host.mkdir()
    for name in wheelhouse.closure([Requirement(wheelhouse.HOST_PROVIDES)]):
        distribution = metadata.distribution(name)
        tops = {Path(str(file)).parts[0] for file in distribution.files or []}
        for top in tops - {"..", "__pycache__"}:
            source = Path(str(distribution.locate_file(top)))
            if not (host / top).exists():
                (host / top).symlink_to(source)
    environment = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True)
    python = environment / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site_packages) / "host-packages.pth").write_text(f"{host}\n")
    return python


def test_gpu_sh_runs_from_a_wheelhouse_on_a_host_that_has_only_pytorch(tmp_path: Path) -> None:
    python = torch_only_python(tmp_path)
    missing = subprocess.run([str(python), "-c", "import diffusers"], capture_output=True)
    assert missing.returncode != 0  # the host really has none of our dependencies
    # scripts/test.sh gathers it before the tests, which run where no package index answers.
    gathered = os.environ.get(WHEELHOUSE_VARIABLE)
    wheels = Path(gathered) if gathered else tmp_path / "wheels"
    if not gathered:
        assert wheelhouse.main([str(wheels)]) == 0
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {"PYTHON": str(python), "TMPDIR": str(temporary)}
    run_gpu_sh(tmp_path / "gpu.md", "--wheelhouse", str(wheels), env=environment)
    assert not list(temporary.glob("flux-gpu-site-*"))  # the run's own packages are gone again
