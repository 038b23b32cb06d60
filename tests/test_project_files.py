"""The files a user of a public package expects (issue 29, finding 9): the license pyproject.toml names, a citation of
the thesis and of this software, a changelog, a README that is a landing page whose links lead somewhere, and a test
command that installs what the tests need (so the namespace test and the site's build are not skipped)."""
from __future__ import annotations

import re

import yaml

from conftest import REPO


def test_license_is_the_mit_license_that_pyproject_names():
    assert re.search(r'^license = "MIT"$', (REPO / "pyproject.toml").read_text(), flags=re.M)
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the tplightning authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text


def test_citation_names_the_thesis_and_the_software():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    version = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert cff["version"] == version
    thesis = cff["preferred-citation"]
    assert thesis["type"] == "thesis" and thesis["year"] == 2019 and thesis["institution"]["name"] == "KU Leuven"
    assert thesis["authors"] == [{"family-names": "Meulemans", "given-names": "Alexander"}]


def test_changelog_has_this_round():
    text = (REPO / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n") and "## Earlier rounds" in text
    for change in ("package and the lab are split", "configs are package data", "typed errors", "pieces as values",
                   "documentation site", "checksums", "workers that die", "bounded"):  # fmt: skip
        assert change in text, change


def test_readme_is_a_landing_page_with_working_links():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 130  # a landing page: what, install, two commands, links, tests, the layout (issue 26)
    for heading in ("## Install", "## Two commands", "## Documentation", "## Tests", "## License"):
        assert f"\n{heading}\n" in text, heading
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (REPO / target).exists(), target


def test_readme_test_command_installs_every_extra_the_tests_use():
    text = (REPO / "README.md").read_text()
    command = next(line for line in text.splitlines() if line.endswith("python -m pytest -q"))
    extras = set(re.search(r'pip install -e "\.\[([^\]]+)\]"', command).group(1).split(","))
    assert {"test", "lightning", "docs", "tune", "plots"} <= extras, extras
