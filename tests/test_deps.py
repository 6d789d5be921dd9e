import json
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, replace

import pytest

from conftest import fake_nvidia_smi
from fastsd import deps
from fastsd.errors import OfflineError


@pytest.fixture(scope="module")
def dummy_wheels(tmp_path_factory):
    """Real wheels of two one-module packages (0.3 depends on nothing), built offline."""
    out = tmp_path_factory.mktemp("wheels")
    for version in ("0.3", "0.4"):
        src = tmp_path_factory.mktemp("src")
        (src / "fastsd_dummy_pkg.py").write_text(f"VALUE = {version!r}\n")
        (src / "setup.py").write_text(
            "from setuptools import setup\n"
            f"setup(name='fastsd-dummy-pkg', version='{version}', "
            "py_modules=['fastsd_dummy_pkg'])\n")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out), str(src)],
                       check=True, capture_output=True)
    return out


def test_requirements_never_name_torch():
    names = [deps._canonical(deps._name(r)) for r in deps.read_requirements()]
    assert "diffusers" in names and "transformers" in names
    assert not set(names) & {"torch", "torchvision", "torchaudio"}
    assert all("==" in r for r in deps.read_requirements()), "every requirement is pinned"


def test_ipywidgets_is_pinned_to_what_colab_ships():
    (pin,) = [r for r in deps.read_requirements() if r.startswith("ipywidgets==")]
    assert pin.startswith("ipywidgets==7."), "Colab's front end renders ipywidgets 7"


def test_missing_compares_pins_with_what_is_installed():
    import diffusers

    assert deps.missing([f"diffusers=={diffusers.__version__}"]) == []
    assert deps.missing(["diffusers==0.0.1"]) == ["diffusers==0.0.1"]
    assert deps.missing(["fastsd-no-such-package==1.0"]) == ["fastsd-no-such-package==1.0"]


def test_fingerprint_names_torch_with_its_label_cuda_and_the_pins(workspace):
    import torch

    fp = deps.Fingerprint.here(["a==1"])
    assert fp.torch == torch.__version__ and "+" in fp.torch  # the local label is kept
    assert fp.cuda == torch.version.cuda
    assert fp.python == f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert deps.Fingerprint.here(["a==2"]).pins != fp.pins
    house = deps.wheelhouse(fingerprint=fp)
    assert house.parent == workspace / "wheels"
    assert house.name == fp.key and fp.torch.replace("+", "_") in house.name


def _house(tmp_path, wheels, fp):
    house = tmp_path / "house"
    house.mkdir()
    sizes = {}
    for w in wheels.glob("*0.3*.whl"):
        (house / w.name).write_bytes(w.read_bytes())
        sizes[w.name] = w.stat().st_size
    (house / deps.MANIFEST).write_text(json.dumps(
        {"fingerprint": asdict(fp), "wheels": sizes}))
    return house, next(iter(sizes))


def test_a_foreign_truncated_or_missing_wheelhouse_is_never_used(tmp_path, dummy_wheels):
    fp = deps.Fingerprint.here(["fastsd-dummy-pkg==0.3"])
    house, name = _house(tmp_path, dummy_wheels, fp)
    assert deps.problem(house, fp) is None
    assert deps.problem(house, replace(fp, torch="2.0.0+cu118")) == \
        "it was built for another runtime"
    data = (house / name).read_bytes()
    (house / name).write_bytes(data[: len(data) // 2])
    assert deps.problem(house, fp) == f"{name} is truncated"
    (house / name).write_bytes(b"\0" * len(data))  # right size, not a wheel
    assert "is damaged" in deps.problem(house, fp)
    (house / name).unlink()
    assert deps.problem(house, fp) == f"{name} is missing"
    (house / deps.MANIFEST).unlink()
    assert deps.problem(house, fp) == "it has no manifest"
    assert deps.problem(tmp_path / "none", fp) == "it has not been built yet"


def test_a_missing_wheelhouse_without_network_is_a_clear_error(workspace):
    with pytest.raises(OfflineError, match="cannot be used: it has not been built yet.*"
                       "install cell once with internet"):
        deps.install(requirements=["fastsd-other-pkg==1.0"], build=False)


def test_nothing_to_do_when_everything_is_installed(workspace):
    import tqdm

    report = deps.install(requirements=[f"tqdm=={tqdm.__version__}"], build=False)
    assert report.needed == [] and not report.installed
    assert report.summary() == "All pinned packages are installed."


@pytest.fixture
def local_index(dummy_wheels, monkeypatch):
    """pip's only source is a folder of wheels (no index), as an index would serve them."""
    for k in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(dummy_wheels))
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "fastsd-dummy-pkg"],
                   capture_output=True)


def test_install_builds_then_rebuilds_a_damaged_wheelhouse(workspace, local_index):
    reqs = ["fastsd-dummy-pkg==0.3"]
    report = deps.install(requirements=reqs, installer="pip")
    assert report.built and report.installed and report.rebuilt_because is None
    house = report.wheelhouse
    (wheel,) = house.glob("*.whl")
    assert wheel.name.startswith("fastsd_dummy_pkg-0.3")
    assert deps.problem(house, deps.Fingerprint.here(reqs)) is None
    from importlib import metadata

    assert metadata.version("fastsd-dummy-pkg") == "0.3"
    # Another version installed (a runtime that differs): reinstalled from the wheelhouse.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "fastsd-dummy-pkg==0.4"],
                   check=True, capture_output=True)
    wheel.write_bytes(wheel.read_bytes()[:100])  # and the Drive copy was cut short
    report = deps.install(requirements=reqs, installer="pip")
    assert report.rebuilt_because == f"{wheel.name} is truncated"
    assert metadata.version("fastsd-dummy-pkg") == "0.3"
    zipfile.ZipFile(wheel).testzip()
    assert not [p for p in house.parent.iterdir() if p.name.startswith(".fastsd-tmp-")]


def test_restart_is_reported_for_an_upgraded_package_already_imported(workspace, local_index):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "fastsd-dummy-pkg==0.4"],
                   check=True, capture_output=True)
    import importlib

    importlib.invalidate_caches()
    import fastsd_dummy_pkg  # noqa: F401  the kernel has it loaded

    try:
        report = deps.install(requirements=["fastsd-dummy-pkg==0.3"], installer="pip")
    finally:
        sys.modules.pop("fastsd_dummy_pkg", None)
    assert report.restart_needed == ["fastsd-dummy-pkg"]
    assert "Restart the session" in report.summary() and "Restart_If_Needed" in report.summary()


def test_an_unreachable_index_is_an_offline_error(workspace, monkeypatch):
    for k in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(OfflineError, match="needs the package index once"):
        deps.install(requirements=["fastsd-other-pkg==1.0"], installer="pip")


def test_doctor_reports_each_pin_against_what_is_installed(workspace):
    import tqdm

    checks = {c.name: c for c in deps.doctor(requirements=[f"tqdm=={tqdm.__version__}",
                                                           "diffusers==0.0.1"])}
    assert checks["pin tqdm"].ok
    assert not checks["pin diffusers"].ok and "pinned 0.0.1" in checks["pin diffusers"].value
    assert checks["torch"].ok and "+" in checks["torch"].value
    assert {"python", "CUDA", "GPU", "local disk free", "wheelhouse"} <= set(checks)
    text = deps.format_checks(list(checks.values()))
    assert "BAD pin diffusers" in text and "Run the install cell" in text


def test_doctor_cli(workspace):
    from fastsd import cli

    assert cli.main(["doctor"]) == 0


def test_install_cli_is_what_doctor_advises(workspace, capsys):
    from fastsd import cli

    bad = [c for c in deps.doctor(requirements=["diffusers==0.0.1"]) if not c.ok]
    assert "`fastsd install`" in next(c.advice for c in bad if c.name == "pin diffusers")
    assert cli.main(["install", "--offline"]) == 0  # this venv has every pin
    assert "All pinned packages are installed." in capsys.readouterr().out


DOCTOR_IN_A_CHILD = """
import json, sys
from fastsd import deps
checks = deps.doctor(requirements=[], deep={deep})
print(json.dumps({{"checks": {{c.name: [c.value, c.ok] for c in checks}},
                  "torch_imported": "torch" in sys.modules}}))
"""


def run_doctor(workspace, path: str, deep: bool = False) -> dict:
    env = {**os.environ, "PATH": path, "FASTSD_HOME": str(workspace)}
    out = subprocess.run([sys.executable, "-c", DOCTOR_IN_A_CHILD.format(deep=deep)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_doctor_reads_the_gpu_from_the_driver_without_importing_torch(workspace, tmp_path):
    # A stand-in for a T4's driver (and a MIG slice's); everything else is the real doctor
    # in a fresh process.
    bin_dir = fake_nvidia_smi(tmp_path / "bin", "Tesla T4, 14930, 15360",
                              "A100 MIG 1g.10gb, [N/A], [N/A]")
    got = run_doctor(workspace, f"{bin_dir}:/usr/bin:/bin")
    assert got["torch_imported"] is False, "doctor must not load torch into the kernel"
    assert got["checks"]["GPU"] == ["Tesla T4, 14.58 of 15.0 GiB free", True]
    assert got["checks"]["GPU 1"] == ["A100 MIG 1g.10gb, memory not reported", True]
    # this machine's torch is a CPU build: with a GPU present that is a known problem
    assert got["checks"]["known problem"][0] == "a GPU but a CPU-only torch"

    none = run_doctor(workspace, "/usr/bin:/bin")
    assert none["torch_imported"] is False
    assert none["checks"]["GPU"] == ["none (no NVIDIA driver answers)", False]
    assert "known problem" not in none["checks"]

    deep = run_doctor(workspace, "/usr/bin:/bin", deep=True)
    assert deep["torch_imported"] is True and deep["checks"]["GPU"][0].endswith("(cpu)")
