"""The distribution installs one import package, ``rlhf_launch``, named after itself: the wheel holds no other
top-level package, carries the sbatch template, and in a fresh environment the old names do not import."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: an in-tree build would leave build/lib behind, whose stale modules a later build packs.
    source = tmp_path_factory.mktemp("source") / "rlhf-launch"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "__pycache__"))
    # no build isolation: the test venv's setuptools builds it, so nothing is downloaded
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    (found,) = out.glob("rlhf_launch-*.whl")
    return found


def top_level_names(wheel: Path) -> set[str]:
    """The first path component of every file in the wheel that is not its metadata."""
    with zipfile.ZipFile(wheel) as zf:
        return {name.split("/")[0] for name in zf.namelist() if ".dist-info/" not in name}


def test_the_wheel_holds_one_top_level_package(wheel):
    assert top_level_names(wheel) == {"rlhf_launch"}


def test_the_wheel_carries_the_sbatch_template_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rlhf_launch/frontend/backends/templates/rlhf_job.sbatch.j2" in names
    assert "rlhf-launch = rlhf_launch.frontend.cli:main" in entry_points


def test_installed_alone_only_rlhf_launch_imports(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True)
    probe = (
        "import importlib.util, json; import rlhf_launch.core.config; "
        "print(json.dumps({name: importlib.util.find_spec(name) is not None for name in ('rlhf_launch', 'rlhf', 'launcher')}))"
    )
    # from an empty folder, so that the checkout itself is not on sys.path
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == '{"rlhf_launch": true, "rlhf": false, "launcher": false}'
