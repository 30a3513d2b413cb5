"""The environment the tests run in is the one requirements.lock describes: a machine that installed other releases
(by hand, or an older lock) fails here, by name, instead of passing on packages CI never tested."""

from __future__ import annotations

import re
from importlib import metadata

from conftest import REPO

# pip and setuptools are locked so the upgrade path (.ci/relock) is reproducible, but the interpreter's own copies
# (a virtualenv's seed) may legitimately differ where the lock was installed with an older pip.
TOOLING = {"pip", "setuptools"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[normalise(match[1])] = match[2]
    return pins


def test_every_locked_package_is_installed_at_its_locked_version():
    pins = locked()
    assert {"torch", "transformers", "trl", "peft", "pytest", "pytest-xdist"} <= pins.keys()
    drift = []
    for name, version in sorted(pins.items()):
        if name in TOOLING:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: locked {version}, not installed")
            continue
        if installed != version:
            drift.append(f"{name}: locked {version}, installed {installed}")
    assert not drift, ("installed packages differ from requirements.lock (install with README's test command, or "
                       "re-lock with `bash .ci/relock`):\n" + "\n".join(drift))


def test_the_lock_satisfies_pyproject_ranges():
    """A lock resolved before pyproject.toml's ranges changed would install what the package says it does not
    support; re-resolve it (bash .ci/relock)."""
    import tomllib

    from packaging.requirements import Requirement

    pins = locked()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for spec in map(Requirement, wanted):
        name = normalise(spec.name)
        assert name in pins, f"{spec.name} is a dependency in pyproject.toml but not in requirements.lock"
        assert spec.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {spec}"


def test_ci_runs_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{command}\n```" in readme
    assert "-r requirements.lock" in command
