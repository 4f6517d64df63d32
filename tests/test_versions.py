"""The versions of trl, transformers and peft trl_banel relies on: pinned, checked at import, refused outside."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from trl_banel import versions

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_pins_the_tested_ranges():
    deps = {Requirement(d).name: Requirement(d).specifier
            for d in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]}
    for package, (low, high) in versions.TESTED_VERSIONS.items():
        assert deps[package] == SpecifierSet(f">={low},<{high}"), (
            f"pyproject.toml pins {package}{deps[package]} but trl_banel.versions tests {low} to <{high}")


@pytest.mark.parametrize("package", sorted(versions.TESTED_VERSIONS))
def test_installed_version_is_a_tested_one(package):
    from importlib.metadata import version

    low, high = versions.TESTED_VERSIONS[package]
    assert version(package) in SpecifierSet(f">={low},<{high}"), (
        f"{package} {version(package)} is not a version trl_banel is tested with: check trl_banel/adapters.py (and "
        "the trainer's TRL base classes) against it, then move the range in pyproject.toml and trl_banel/versions.py")


@pytest.mark.parametrize("package", sorted(versions.TESTED_VERSIONS))
@pytest.mark.parametrize("unknown", ["0.0.1", "99.0"])
def test_unknown_version_is_refused_by_name(monkeypatch, package, unknown):
    real = versions.metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda name: unknown if name == package else real(name))
    low, high = versions.TESTED_VERSIONS[package]
    with pytest.raises(ImportError, match=f"tested with {package}>={low},<{high} but {package} {unknown} is"):
        versions.check_versions()


def test_tested_versions_pass():
    versions.check_versions()
