"""Packaging: the core install is numpy + torch, every optional module comes with a named extra,
a missing extra is one line, the version is written once, the type hints ship."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import crossent
from crossent._extras import EXTRA_OF, MissingExtraError, require
from crossent.cli import main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirement_name(req: str) -> str:
    """The distribution name of a requirement string (``"scikit-learn>=1.3; ..."`` -> scikit-learn)."""
    for stop in "<>=!~[; ":
        req = req.split(stop)[0]
    return req.strip().lower()


#: the distribution that provides each optional top-level module
DISTRIBUTION_OF = {
    "matplotlib": "matplotlib", "rich": "rich", "sklearn": "scikit-learn", "mnist1d": "mnist1d",
    "transformers": "transformers", "triton": "triton",
}


def _extra_closure(extra: str) -> set[str]:
    """Distributions an extra installs, following self-references (``crossent[plot,cli]``)."""
    out: set[str] = set()
    for req in PROJECT["optional-dependencies"][extra]:
        name = _requirement_name(req)
        if name == "crossent":
            inner = req.split("[", 1)[1].split("]", 1)[0]
            for e in inner.split(","):
                out |= _extra_closure(e.strip())
        else:
            out.add(name)
    return out


def test_core_dependencies_are_numpy_and_torch_only():
    assert sorted(_requirement_name(r) for r in PROJECT["dependencies"]) == ["numpy", "torch"]


@pytest.mark.parametrize("module", sorted(EXTRA_OF))
def test_every_optional_module_has_the_extra_its_error_names(module):
    extra = EXTRA_OF[module]
    if module in DISTRIBUTION_OF:
        assert DISTRIBUTION_OF[module] in _extra_closure(extra)
        assert DISTRIBUTION_OF[module] in _extra_closure("all")
        assert DISTRIBUTION_OF[module] in _extra_closure("dev")  # `make test` installs it


def test_run_extra_carries_plots_and_tables():
    assert {"scikit-learn", "mnist1d", "matplotlib", "rich"} <= _extra_closure("run")
    assert {"pytest", "mypy", "sphinx", "build"} <= _extra_closure("dev")


def test_core_only_environment_imports_and_runs_every_loss_and_metric():
    """The optional modules made unimportable in a subprocess (a meta-path blocker), then every
    loss forward+backward against PyTorch, every module, the calibration metrics, and the
    one-line errors of features that need an extra (.ci/smoke_core.py, also run by CI in a
    fresh virtual environment holding only the wheel and numpy + torch)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "smoke_core.py"), "--block"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("cross_entropy", "focal_loss", "binary_cross_entropy", "sigmoid_focal_loss",
                 "asymmetric_loss", "linear_cross_entropy", "entropy", "kl_divergence", *crossent.nn.__all__,
                 "ece", "brier", "nll"):
        assert f"  {name}" in out, name
    assert "pip install 'crossent[cli]'" in out
    assert "core-only smoke test passed" in out


def test_src_never_imports_an_optional_module_at_top_level():
    """matplotlib, rich, scikit-learn and mnist1d are imported inside the functions that use them."""
    optional = {"matplotlib", "rich", "sklearn", "mnist1d", "mpl_toolkits"}
    offenders = []
    for path in sorted((ROOT / "src" / "crossent").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in optional]
    assert offenders == []


@pytest.mark.parametrize("module,extra", sorted(EXTRA_OF.items()))
def test_require_names_the_extra_in_one_line(module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # an import of it now fails
    with pytest.raises(MissingExtraError) as info:
        require(module, "a feature")
    message = str(info.value)
    assert message == f"a feature needs {module}, which is not installed: pip install 'crossent[{extra}]'"


def test_cli_prints_the_missing_extra_in_one_line_exit_2(monkeypatch, capsys):
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["demo", "--classes", "3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == ("crossent demo: error: crossent demo's table needs rich, which is not installed: "
                   "pip install 'crossent[cli]'")
    assert "Traceback" not in captured.out + captured.err


def test_version_is_single_sourced(capsys):
    from crossent._version import __version__

    assert crossent.__version__ == __version__
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "crossent._version.__version__"}
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert importlib.metadata.version("crossent") == __version__
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"crossent {__version__}"


def test_type_hints_ship():
    assert (ROOT / "src" / "crossent" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["crossent"]
    assert "Typing :: Typed" in PROJECT["classifiers"]


def test_project_urls_and_changelog():
    urls = PROJECT["urls"]
    assert all(u.startswith("https://github.com/crossent/crossent") for u in urls.values())
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{crossent.__version__}]" in changelog and "## [Unreleased]" in changelog


@pytest.mark.parametrize("module", sorted(EXTRA_OF))
def test_cli_names_the_extra_of_any_optional_import_that_fails(module, monkeypatch, capsys):
    """A subcommand that imports an optional module directly (not through require) still ends
    in one line naming the extra, exit 2."""
    import crossent.demo

    def needs_it(args: object) -> int:
        raise ModuleNotFoundError(f"No module named '{module}'", name=f"{module}.sub")

    monkeypatch.setattr(crossent.demo, "main", needs_it)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    install = f"pip install 'crossent[{EXTRA_OF[module]}]'"
    assert err == f"crossent demo: error: {module} is not installed: {install}\n"


def test_cli_keeps_the_traceback_of_other_import_errors(monkeypatch):
    import crossent.demo

    def broken(args: object) -> int:
        raise ModuleNotFoundError("No module named 'crossent._nothing'", name="crossent._nothing")

    monkeypatch.setattr(crossent.demo, "main", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["demo"])
