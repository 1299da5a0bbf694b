"""Tests that repeat the Dockerfile's install steps, since no image can be built here.

The builder stage's COPY lines decide which files go into the wheel, as they do in
the image. The wheel is installed into a fresh venv of a system Python after torch,
and pip is removed. The CLI then runs as the unprivileged user `nobody` from a venv
it cannot write to, like the image's user on a read-only root file system.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
NOBODY_ID = 65534
# Installing torch copies about 900 MB; the limit only stops a hung pip.
PIP_TIMEOUT_SECONDS = 900

VALID_CONFIG = {
    "prometheus": {"url": "http://127.0.0.1:9090", "timeout": "30s"},
    "listen": "127.0.0.1:9464",
    "shard": {"count": 1, "index": 0},
    "torch_threads": 1,
    "detectors": [{
        "name": "node",
        "entity_labels": ["instance"],
        "step": "30s",
        "window": 30,
        "signals": {
            "cpu": '1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[2m]))',
            "memory": "1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes",
        },
        "train": {"range": "7d", "every": "6h"},
        "score": {"every": "1m"},
        "threshold": {"method": "quantile", "false_alarm_rate": 0.001},
    }],
}


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


def builder_copies() -> list[tuple[list[str], str]]:
    """Return the (sources, destination) of each COPY in the builder stage."""
    stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)
    builder = next(stage for stage in stages if re.match(r"\S+ AS builder", stage))
    copies = []
    for line in builder.splitlines():
        if line.startswith("COPY "):
            *sources, destination = line.split()[1:]
            copies.append((sources, destination))
    return copies


def image_python_version() -> str:
    """Return the Python version of the base image, e.g. 3.11 for python:3.11-slim-bookworm."""
    match = re.match(r"python:(\d+\.\d+)", dockerfile_arg("PYTHON_IMAGE"))
    assert match, "PYTHON_IMAGE is not an official python image; update this test"
    return match.group(1)


def as_non_root() -> list[str]:
    """Return the command prefix that drops root, or nothing when the tests run unprivileged already."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY_ID}", f"--regid={NOBODY_ID}", "--clear-groups", "--"]


def find_python(version: str) -> str | None:
    """Find a python<version> that the non-root user can run; pyenv builds under /root cannot be."""
    candidates = [os.environ.get("IMAGE_TEST_PYTHON"), f"/usr/bin/python{version}", shutil.which(f"python{version}")]
    for candidate in candidates:
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run(as_non_root() + [candidate, "-c", "import venv, ensurepip"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return candidate
    return None


def run(command: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def pip_output(result: subprocess.CompletedProcess) -> str:
    """Drop the local mirror's 'Location ... is ignored' lines, which pip prints on every run."""
    lines = (result.stdout + result.stderr).splitlines()
    return "\n".join(line for line in lines if "is ignored" not in line)


def copy_build_context(context: Path) -> None:
    for sources, destination in builder_copies():
        for source in sources:
            source_path = REPO_ROOT / source
            assert source_path.exists(), f"the Dockerfile copies {source}, which is missing"
            target = context / destination / (source if destination.endswith("/") else "")
            if source_path.is_dir():
                shutil.copytree(source_path, context / destination,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source_path, target)


@pytest.fixture(scope="module")
def workdir():
    """A folder under /tmp that `nobody` can read; pytest's own tmp_path is private to root."""
    folder = Path(tempfile.mkdtemp(prefix="anomaly-monitor-image-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(workdir) -> Path:
    context = workdir / "context"
    context.mkdir()
    copy_build_context(context)
    wheels = workdir / "wheels"

    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)],
                 timeout=PIP_TIMEOUT_SECONDS)

    assert result.returncode == 0, pip_output(result)
    built = list(wheels.glob("*.whl"))
    assert len(built) == 1, f"expected one wheel, found {built}"
    return built[0]


@pytest.fixture(scope="module")
def venv(workdir, wheel) -> Path:
    python = find_python(image_python_version())
    if python is None:
        pytest.skip(f"no python{image_python_version()} with venv that a non-root user can run; "
                    "set IMAGE_TEST_PYTHON to one")
    venv_dir = workdir / "venv"
    venv_python = str(venv_dir / "bin" / "python")

    created = run([python, "-m", "venv", str(venv_dir)])
    assert created.returncode == 0, created.stderr
    # --no-compile skips writing .pyc files, which halves the time of the torch install
    # and changes only how fast modules load.
    pip_install = [venv_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile"]

    # The same order as the image: torch on its own first, so the wheel's pin finds it installed.
    torch = run(pip_install + [f"torch=={dockerfile_arg('TORCH_VERSION')}"], timeout=PIP_TIMEOUT_SECONDS)
    assert torch.returncode == 0, pip_output(torch)
    package = run(pip_install + [str(wheel)], timeout=PIP_TIMEOUT_SECONDS)
    assert package.returncode == 0, pip_output(package)
    removed = run([venv_python, "-m", "pip", "uninstall", "--yes", "pip"])
    assert removed.returncode == 0, removed.stderr
    return venv_dir


@pytest.fixture(scope="module")
def config_file(workdir) -> Path:
    config = dict(VALID_CONFIG, storage={"path": str(workdir / "models")})
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    return path


def run_as_non_root(venv: Path, *args: str) -> subprocess.CompletedProcess:
    # A bare environment, like a container's: no PYTHONPATH into the checkout, and a
    # HOME that does not exist, so any write to it fails.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return run(as_non_root() + list(args), env=env)


def test_dockerfile_runs_as_non_root_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    assert users[-1].split(":")[0] not in ("0", "root")


def test_dockerfile_installs_cpu_torch():
    text = DOCKERFILE.read_text()
    assert dockerfile_arg("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" "torch==\$\{TORCH_VERSION\}"', text)


def test_torch_pin_matches_package():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'"torch=={dockerfile_arg("TORCH_VERSION")}"' in pyproject


def test_runtime_stage_has_no_builder_files():
    runtime = DOCKERFILE.read_text().split(" AS runtime", 1)[1]
    assert "COPY --from=builder /wheels" in runtime
    assert not re.search(r"^COPY (?!--from=builder)", runtime, re.MULTILINE), "the runtime stage copies source files"
    assert not re.search(r"apt-get install|build-essential|gcc", runtime)


def test_dockerignore_admits_copied_files():
    """The build context must contain every file the builder stage copies."""
    admitted = [line.removeprefix("!").rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")]
    for sources, _ in builder_copies():
        for source in sources:
            assert source in admitted, f".dockerignore leaves {source} out of the build context"


def test_cli_runs_as_non_root(venv):
    result = run_as_non_root(venv, str(venv / "bin" / "python"), "-c", "import os; print(os.geteuid())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != "0"


def test_cli_help(venv):
    result = run_as_non_root(venv, str(venv / "bin" / "anomaly-monitor"), "--help")
    assert result.returncode == 0, result.stderr
    assert "check-config" in result.stdout
    assert "run" in result.stdout


def test_cli_check_config_valid(venv, config_file):
    result = run_as_non_root(venv, str(venv / "bin" / "anomaly-monitor"), "check-config", "--config", str(config_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config is valid" in result.stdout


def test_cli_check_config_invalid(venv, workdir):
    bad = workdir / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(VALID_CONFIG, torch_threads="many")))
    bad.chmod(0o644)

    result = run_as_non_root(venv, str(venv / "bin" / "anomaly-monitor"), "check-config", "--config", str(bad))

    assert result.returncode == 2, result.stdout + result.stderr
    assert "torch_threads" in result.stderr


def test_venv_torch_is_cpu_build(venv):
    code = "import torch; print(torch.__version__, torch.version.cuda)"
    result = run_as_non_root(venv, str(venv / "bin" / "python"), "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{dockerfile_arg('TORCH_VERSION')}+cpu", "None"]


def test_venv_has_no_pip(venv):
    result = run_as_non_root(venv, str(venv / "bin" / "python"), "-m", "pip", "--version")
    assert result.returncode != 0
