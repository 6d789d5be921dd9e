from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def requirements() -> list[str]:
    """Every pin of requirements-colab.txt (comments dropped): what fastsd needs on top of
    Colab's own torch. Installed, fastsd reads them back from its metadata
    (fastsd.deps.read_requirements)."""
    lines = (here / "requirements-colab.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="fastsd",
    version="0.1.0",
    description="DreamBooth fine-tuning of Stable Diffusion from Colab, resumable and offline-testable",
    # The project's public address, set here only: `python tests/test_notebooks.py` writes
    # it into the install cell's default source and the README's Colab links.
    url="https://github.com/fastsd/fastsd",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # sessions_template/ (top level, the folder a new session is copied from) is installed
    # inside the package as fastsd.sessions_template, by a regular install and an editable
    # one alike.
    packages=[*find_packages(include=["fastsd", "fastsd.*"]), "fastsd.sessions_template"],
    package_dir={"fastsd.sessions_template": "sessions_template"},
    package_data={"fastsd.models": ["registry.json"],
                  "fastsd.sessions_template": ["README.txt", "*/.keep"]},
    install_requires=["torch>=2.1", *requirements()],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "nbclient>=0.10", "nbformat>=5.10",
                            "ipykernel>=6.29", "import-linter==2.16", "webuiapi==0.9.17",
                            "requests>=2.31", "playwright==1.65.2", "mfusepy==3.1.1",
                            "nbval==0.11.0", "build==1.6.1"]},
    entry_points={"console_scripts": ["fastsd=fastsd.cli:main"]},
)
