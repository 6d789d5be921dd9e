import subprocess
import sys

import pytest

from fastsd import deps
from fastsd.errors import OfflineError


@pytest.fixture(scope="module")
def dummy_wheel(tmp_path_factory):
    """A real wheel of a one-module package, built offline."""
    src = tmp_path_factory.mktemp("src")
    (src / "fastsd_dummy_pkg.py").write_text("VALUE = 42\n")
    (src / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='fastsd-dummy-pkg', version='0.3', py_modules=['fastsd_dummy_pkg'])\n")
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def test_requirements_never_name_torch():
    names = [deps._canonical(deps._name(r)) for r in deps.read_requirements()]
    assert "diffusers" in names and "transformers" in names
    assert not set(names) & {"torch", "torchvision", "torchaudio"}
    assert all("==" in r for r in deps.read_requirements()), "every requirement is pinned"


def test_missing_compares_pins_with_what_is_installed():
    import diffusers

    assert deps.missing([f"diffusers=={diffusers.__version__}"]) == []
    assert deps.missing(["diffusers==0.0.1"]) == ["diffusers==0.0.1"]
    assert deps.missing(["fastsd-no-such-package==1.0"]) == ["fastsd-no-such-package==1.0"]


def test_wheelhouse_is_keyed_by_python_and_platform(workspace):
    house = deps.wheelhouse()
    assert house.parent == workspace / "wheels"
    assert house.name.startswith(f"cp{sys.version_info.major}{sys.version_info.minor}-")


def test_install_from_the_drive_wheelhouse_offline(workspace, dummy_wheel, tmp_path):
    house = deps.wheelhouse()
    house.mkdir(parents=True)
    (house / dummy_wheel.name).write_bytes(dummy_wheel.read_bytes())
    target = tmp_path / "site"
    report = deps.install(requirements=["fastsd-dummy-pkg==0.3"], target=target, build=False)
    assert report.installed and not report.built
    assert (target / "fastsd_dummy_pkg.py").read_text() == "VALUE = 42\n"


def test_a_missing_wheel_without_network_is_a_clear_error(workspace, tmp_path):
    with pytest.raises(OfflineError, match="lacks wheels for: fastsd-other-pkg"):
        deps.install(requirements=["fastsd-other-pkg==1.0"], target=tmp_path / "site",
                     build=False)


def test_nothing_to_do_when_everything_is_installed(workspace):
    import tqdm

    report = deps.install(requirements=[f"tqdm=={tqdm.__version__}"], build=False)
    assert report.needed == [] and not report.installed
