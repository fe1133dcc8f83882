"""The documentation: every public name in the API reference, the pages the site promises, the
figures they show, a README valid on a package index (absolute links only), and the identity the
formulation page states."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossent

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILT = DOCS / "_build" / "html"

#: module -> its public names, as the reference must show them
PUBLIC_MODULES = {
    "crossent": [n for n in crossent.__all__ if n != "__version__"] + sorted(crossent._OPTIONAL_FUNCTIONS),
    "crossent.nn": None,
    "crossent.calibration": None,
    "crossent.distributed": None,
    "crossent.integrations.transformers": None,
}


def _public_names() -> list[tuple[str, str]]:
    out = []
    for module_name, names in PUBLIC_MODULES.items():
        module = importlib.import_module(module_name)
        out += [(module_name, n) for n in (names if names is not None else module.__all__)]
    return out


def _documented_as(module_name: str, name: str) -> set[str]:
    """The dotted names under which the reference may list ``module.name``: where it is defined
    (``crossent.cross_entropy`` is ``crossent.functional.cross_entropy``) or where it is exported."""
    obj = getattr(importlib.import_module(module_name), name)
    names = {f"{module_name}.{name}"}
    if hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
        names.add(f"{obj.__module__}.{obj.__qualname__}")
    if isinstance(obj, type(crossent)):  # a submodule
        names.add(obj.__name__)
    return names


def _newest_source() -> float:
    files = [*(ROOT / "src" / "crossent").rglob("*.py"), *DOCS.glob("*.md"), DOCS / "conf.py"]
    return max(p.stat().st_mtime for p in files)


@pytest.fixture(scope="module")
def inventory() -> set[str]:
    """The objects of the built reference (docs/_build/html/objects.inv, from `make docs`); built
    here, warnings as errors, when it is missing or older than the sources."""
    inv = BUILT / "objects.inv"
    if not inv.exists() or inv.stat().st_mtime < _newest_source():
        proc = subprocess.run(
            [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", str(DOCS), str(BUILT)],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    from sphinx.util.inventory import InventoryFile

    with open(inv, "rb") as f:
        data = InventoryFile.load(f, "", lambda base, uri: uri)
    names: set[str] = set()
    for role, entries in data.data.items() if hasattr(data, "data") else data.items():
        if role.startswith("py:"):
            names |= set(entries)
    return names


@pytest.mark.parametrize("module_name,name", _public_names())
def test_every_public_name_is_in_the_api_reference(module_name, name, inventory):
    candidates = _documented_as(module_name, name)
    assert candidates & inventory, f"{module_name}.{name} is not in the API reference (tried {candidates})"


PAGES = [
    "index", "getting-started", "formulation", "choosing", "usage",
    "api", "benchmarks", "design", "changelog",
]


@pytest.mark.parametrize("page", PAGES)
def test_the_site_has_its_pages(page):
    assert (DOCS / f"{page}.md").is_file()
    toctree = (DOCS / "index.md").read_text()
    assert page == "index" or f"\n{page}\n" in toctree


def test_every_figure_a_page_shows_exists():
    image = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")
    shown = [(page, m) for page in DOCS.glob("*.md") for m in image.findall(page.read_text())]
    assert shown, "the guide shows the study's figures"
    for page, target in shown:
        assert (page.parent / target).is_file(), f"{page.name}: {target} does not exist"


def test_the_formulation_page_derives_what_it_promises():
    text = (DOCS / "formulation.md").read_text()
    promised = ("KL", "H(t)", "varepsilon", "Bernoulli", r"\mathrm{CE} - \gamma\,H(q)", r"q_k - \tilde t_k")
    for fragment in promised:
        assert fragment in text, fragment


def test_readme_links_are_absolute():
    """A package index shows the README without the repository: relative links would break."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme) + re.findall(r'src="([^"]+)"', readme)
    assert links, "the landing page links to the documentation"
    relative = [link for link in links if not link.startswith(("https://", "http://", "mailto:"))]
    assert relative == []


@pytest.mark.parametrize("C,seed", [(2, 0), (3, 1), (10, 2), (257, 3)])
def test_cross_entropy_is_kl_plus_entropy(C, seed):
    """CE(t, q) = KL(t || q) + H(t), the identity the formulation page opens with."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(16, C, generator=gen, dtype=torch.float64) * 3
    t = torch.softmax(torch.randn(16, C, generator=gen, dtype=torch.float64) * 2, 1)
    ce = crossent.cross_entropy(z, t, reduction="none")
    kl = crossent.kl_divergence(z, t, reduction="none")
    h = crossent.entropy(t, input_is_logits=False, reduction="none")
    torch.testing.assert_close(ce, kl + h, rtol=1e-12, atol=1e-12)
    manual = -(t * torch.log_softmax(z, 1)).sum(1)
    torch.testing.assert_close(ce, manual, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0, 3.0, 5.0])
def test_focal_loss_bound_stated_in_the_docs(gamma):
    """FL_gamma >= CE - gamma * H(q) per sample for gamma >= 1 (Mukhoti et al. 2020)."""
    gen = torch.Generator().manual_seed(int(gamma * 10))
    z = torch.randn(512, 7, generator=gen, dtype=torch.float64) * 4
    y = torch.randint(0, 7, (512,), generator=gen)
    fl = crossent.focal_loss(z, y, gamma=gamma, reduction="none")
    ce = crossent.cross_entropy(z, y, reduction="none")
    h = crossent.entropy(z, reduction="none")
    assert bool((fl >= ce - gamma * h - 1e-12).all())
    assert bool((fl <= ce + 1e-12).all())
