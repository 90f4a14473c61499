"""The README and docs/ are read in a clone: every relative link resolves inside the repository,
every method has its page linked from the README, and the install instructions keep both the
command that works here and the way to the CPU build of torch elsewhere."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
METHOD_PAGES = ("magnitude", "wanda", "sparsegpt", "admm", "owl", "quantization", "distillation", "double_sparsity")


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:|#", t)]


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or not path.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing in a clone:\n" + "\n".join(broken)


def test_no_path_outside_the_repository():
    for page in PAGES:
        assert "../shared" not in page.read_text(), page


def test_each_method_has_a_page_linked_from_the_readme():
    linked = set(relative_links(ROOT / "README.md"))
    for name in METHOD_PAGES:
        page = ROOT / "docs" / f"{name}.md"
        assert page.is_file() and f"docs/{name}.md" in linked, name
        text = page.read_text()
        assert "## What it computes" in text and "## Options" in text and "## Reference numbers" in text, name


def test_install_keeps_the_command_that_works_here_and_names_the_cpu_index():
    text = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 -e . && sparsify models install smollm2-135m" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
