"""The install: the lock covers pyproject's dependencies, the smoke check catches broken binaries, the wheel works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"


def locked_versions() -> dict[str, set[str]]:
    """Package -> the exact versions the lock pins (one per Python-version fork)."""
    pins: dict[str, set[str]] = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", line)
        if m:
            pins.setdefault(canonicalize_name(m.group(1)), set()).add(m.group(2))
    return pins


def test_lock_pins_every_dependency_of_pyproject_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    wanted += [line for line in (REPO / "requirements" / "build.in").read_text().splitlines()
               if line.strip() and not line.startswith("#")]  # fmt: skip
    pins = locked_versions()
    for spec in map(Requirement, wanted):
        name = canonicalize_name(spec.name)
        assert name in pins, f"{spec} is not in {LOCK.name}: run `make lock`"
        for version in pins[name]:
            assert spec.specifier.contains(version, prereleases=True), (
                f"{LOCK.name} pins {name}=={version}, outside pyproject's {spec}: run `make lock`")
    # every pinned line carries a hash (pip --require-hashes refuses the lock otherwise)
    text = LOCK.read_text()
    assert text.count("==") <= text.count("--hash=sha256:")


def test_lock_pins_a_torchaudio_built_for_its_torch():
    pins = locked_versions()
    assert pins["torch"] == {"2.11.0"}
    # torchaudio 2.11.1's libtorchaudio.so does not load with torch 2.11.0 (undefined symbol)
    assert pins["torchaudio"] == {"2.11.0"}


def run_smoke(tmp_path: Path, broken: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if broken is not None:  # a package on the path ahead of the real one that fails to load, as a bad binary does
        fake = tmp_path / "fake" / broken
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            f"raise ImportError('lib{broken}.so: undefined symbol: torch_exception_get_what_without_backtrace')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "dfl.smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_smoke_check_runs_every_compiled_component(tmp_path):
    proc = run_smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for component in ("torch", "torchaudio", "soundfile", "pesq", "onnxruntime", "dfl CPU kernels"):
        assert re.search(rf"^\s+ok\s+{component}", proc.stdout, re.M), proc.stdout
    assert "smoke check passed" in proc.stdout


@pytest.mark.parametrize("broken", ["torchaudio", "pesq", "onnxruntime"])
def test_smoke_check_names_a_broken_extension_and_the_fix(tmp_path, broken):
    proc = run_smoke(tmp_path, broken)
    assert proc.returncode == 1
    assert "smoke check FAILED" in proc.stderr
    failed = [line for line in proc.stdout.splitlines() if "FAIL" in line]
    assert len(failed) == 1 and broken in failed[0] and "undefined symbol" in failed[0], proc.stdout
    assert "fix:" in proc.stderr and "make install" in proc.stderr


def test_wheel_carries_its_configs_and_runs_outside_the_repository(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("dfl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    assert (target / "dfl" / "conf" / "train.yaml").is_file() and not (target / "dfl" / "conf").is_symlink()
    # the wheel's package, not the checkout's, and no source tree reachable from the working directory
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import dfl.hydra_resolvers as h; print(h.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(where.stdout.strip()) == target / "dfl" / "conf"
    expected = {"dfl-train": ["experiment=demo"], "dfl-pretrain": ["pretrain/experiment=demo"], "dfl-eval": []}
    for tool, overrides in expected.items():
        proc = subprocess.run([str(target / "bin" / tool), *overrides, "--cfg", "job"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, f"{tool}: {proc.stderr[-2000:]}"
        assert "_target_:" in proc.stdout or "split: test" in proc.stdout, proc.stdout[:500]
    train = subprocess.run([str(target / "bin" / "dfl-train"), "experiment=demo", "--cfg", "job"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "task_name: demo" in train and "SyntheticSpeechDataModule" in train
    assert not list(elsewhere.iterdir()), "--cfg job must not write into the working directory"


def test_the_readmes_python_snippets_run():
    """Every ```python block of the README runs as written."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["per_layer"].shape == (6,)
