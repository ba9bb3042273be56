"""The package as Dockerfile.gpu installs it: built into a wheel, installed non-editable away from
the repository, run from another directory with the image's environment.

An editable install (every other test) finds models/ and configs/ beside the code; an installed
one does not, which is how the image once failed to find any model manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.unit.test_bench_report import baseline

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile.gpu").read_text()


def image_env(app: Path) -> dict[str, str]:
    """The image's ENV lines, with its /app (WORKDIR) moved to `app`."""
    env = {}
    for name, value in re.findall(r"^ENV (\w+)=(\S+)$", DOCKERFILE, re.MULTILINE):
        env[name] = value.replace("/app", str(app), 1) if value.startswith("/app") else value
    return env


def test_installed_keel_validates_the_gpu_config_and_lists_models_from_outside_the_repo(tmp_path):
    src, site, app, elsewhere = (tmp_path / d for d in ("src", "site", "app", "elsewhere"))
    # What the image copies: the package sources to build, then models/ and configs/ under /app.
    shutil.copytree(REPO / "serving", src / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    for d in ("models", "configs"):
        shutil.copytree(REPO / d, app / d)
    elsewhere.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        timeout=300,
    )
    assert not (site / "models").exists()  # REPO_ROOT/models, as the installed package sees it

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KEEL_MODELS_DIR")}
    env["PYTHONPATH"] = str(site)  # the dependencies stay this interpreter's own
    keel = [sys.executable, str(site / "bin" / "keel")]  # the console script the wheel declares

    def run(*args, extra=None):
        return subprocess.run(
            [*keel, *args], cwd=elsewhere, env={**env, **(extra or {})}, capture_output=True, text=True, timeout=300
        )

    where = subprocess.run(
        [sys.executable, "-c", "import serving; print(serving.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site))

    bare = run("models", "list")
    assert bare.returncode == 1 and "KEEL_MODELS_DIR" in bare.stderr

    image = image_env(app)
    assert image["KEEL_MODELS_DIR"] == str(app / "models")
    listed = run("models", "list", extra=image)
    assert listed.returncode == 0, listed.stderr
    assert "llama-3-8b-instruct" in listed.stdout and "demo-tiny" in listed.stdout

    valid = run("config", "validate", str(app / "configs" / "gpu.example.yaml"), extra=image)
    assert valid.returncode == 0, valid.stderr
    assert "ok (1 model(s): llama-3-8b)" in valid.stdout

    # keel bench ships in the package (benchmarks/ is not installed), its report templates with it.
    result = elsewhere / "bench-nightly.json"
    result.write_text(json.dumps(baseline()))
    report = run("bench", "report", str(result), "--out", str(elsewhere / "report"), extra=image)
    assert report.returncode == 0, report.stderr
    assert "Setting `max_num_seqs=8`" in report.stdout
    page = (elsewhere / "report" / "report.html").read_text()
    assert "<h3>Setting <code>max_num_seqs=8</code></h3>" in page and page.count("data:image/png;base64,") == 3
