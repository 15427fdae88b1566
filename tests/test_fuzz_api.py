"""At least 500 generated requests from the OpenAPI schema: no 5xx, every answer in the schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

SMALL_LIMITS = {
    "FLUX_SERVE_MAX_IMAGES": "2",
    "FLUX_SERVE_MIN_SIZE": "64",
    "FLUX_SERVE_MAX_SIZE": "128",
    "FLUX_SERVE_DEFAULT_WIDTH": "64",
    "FLUX_SERVE_DEFAULT_HEIGHT": "64",
    "FLUX_SERVE_MAX_STEPS": "2",
    "FLUX_SERVE_MAX_DIVERSITY_VALUES": "2",
    "FLUX_SERVE_MAX_GPUS_PER_REQUEST": "2",
    "FLUX_SERVE_MAX_PROMPT_CHARS": "100",
}


def test_fuzzing_the_api_from_its_schema(tmp_path: Path) -> None:
    count_file = tmp_path / "cases"
    env = {**os.environ, **SMALL_LIMITS, "FUZZ_COUNT_FILE": str(count_file)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz_api.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    cases = int(count_file.read_text())
    print(f"\nfuzzing: {cases} generated requests, no server error, every answer in the schema")
    assert cases >= 500
