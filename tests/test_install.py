"""Installed as a user installs it: `python -m build` makes the sdist and the wheel from the
files of the checkout, the wheel goes into a new, empty venv outside the checkout (real pip,
real dependency resolution from the package index), and the commands run there, in an empty
folder, with nothing of the checkout on any path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = {"default", "openai", "openai-batch", "azure", "vllm", "local-vlm"}


def checkout_copy(dest: Path) -> Path:
    """The files git would commit (tracked and untracked-not-ignored), links kept as links:
    what a fresh clone in CI holds, without .venv, data/ or build/ of this one."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if not os.path.lexists(src):  # deleted in the work tree, not yet in git
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dest / name)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist), built once for the module by `python -m build`, in isolation."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the project's files")
    src = checkout_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


def test_the_pipelines_ship_in_the_sdist_and_the_wheel(dists):
    wheel, sdist = dists
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("recaption/pipelines/")}
        assert "recaption/prompts/dense-v1.md" in whl.namelist()
    assert in_wheel == {f"recaption/pipelines/{name}.yaml" for name in BUNDLED}
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    for name in BUNDLED:  # real files, not the checkout's link to pipelines/
        member = members[f"recaption/pipelines/{name}.yaml"]
        assert member.isfile(), member.name
        assert member.size == (ROOT / "pipelines" / f"{name}.yaml").stat().st_size


def clean_env(venv: Path) -> dict[str, str]:
    """The environment of a shell in that venv: its bin first, no trace of this one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS")
    }
    dev_bin = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != dev_bin]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *rest])
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the run's local Ray on 127.0.0.1 only
    return env


def test_the_wheel_alone_in_a_fresh_venv_runs_the_whole_recipe(dists, tmp_path):
    wheel, _ = dists
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    # a new venv with nothing in it, not even pip: this pip installs into it (`--python`)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = clean_env(venv)

    def pip_install(requirement: str) -> None:
        argv = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        argv += ["install", "--quiet", "--no-compile", requirement]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    def recaption(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv / "bin" / "recaption"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    pip_install(str(wheel))  # the wheel and its dependencies, no extra
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import recaption; print(recaption.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(venv)), where  # not the checkout's
    version = recaption("--version")
    assert version.returncode == 0 and version.stdout.strip() == "recaption 0.1.0"
    listed = recaption("pipelines")
    assert {line.split()[0] for line in listed.stdout.splitlines()[: len(BUNDLED)]} == BUNDLED
    shown = recaption("pipelines", "show", "openai")
    assert shown.stdout == (ROOT / "pipelines" / "openai.yaml").read_text()

    # without their extras, commands say which extra to install, in one line
    for args, extra in (
        (["samples", "shards"], "samples"),
        (["lens", "train", "--corpus", "corpus"], "train"),
    ):
        missing = recaption(*args)
        assert missing.returncode == 2, missing.stderr
        assert f"pip install 'recaption[{extra}]'" in missing.stderr
        assert "Traceback" not in missing.stderr

    pip_install(f"{wheel}[samples]")
    assert recaption("samples", "shards", "--shards", "2", "--per-shard", "8").returncode == 0
    ran = recaption(
        *("run", "--pipeline", "default", "--input", "shards", "--output", "corpus"),
        *("--set", "ray.workers=1"),
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "recaption: samples: 16 -> " in ran.stdout
    assert "recaption: progress " in ran.stdout and "\r" not in ran.stdout + ran.stderr
    status = recaption("status", "corpus")
    assert status.returncode == 0, status.stderr
    assert "corpus: finished" in status.stdout and "2 committed of 2" in status.stdout
    verified = recaption("verify", "corpus", "--input", "shards")
    assert verified.returncode == 0, verified.stdout
    assert "recaption verify: OK: 2 shards" in verified.stdout
    report = recaption("report", "corpus")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (work / "corpus" / "report" / "index.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["corpus", "shards"]  # nothing else
