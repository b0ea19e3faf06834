"""The documentation runs as written.

* Every ```python block of README.md and docs/*.md runs. The blocks of one file run in
  order in one fresh namespace (a page reads as one session: a later block may use a name
  an earlier one defined), in a temporary working directory (snippets that write a picture
  write it there).
* The generated blocks of the pages that ``scripts/make_docs.py`` owns are up to date:
  every block has a generator and every generator a block, and re-making the cheap ones
  (counts, plans, tables, the summed-softmax example, the speeds read from
  ``benchmarks/results/``) gives the text in the page.
* Every results file is described (date, commit, device, software, command), the
  generators read measurements from those files only, and the pages speak of the product.
* Every image a page shows, and every local page it links to, exists.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]
RESULTS = ROOT / "benchmarks" / "results"
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
FENCE = re.compile(r"^```(\w*)", re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def _make_docs():
    name = "sparsedsl_make_docs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "make_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=_rel)
def test_python_blocks_run_as_written(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for line, code in python_blocks(page):
        where = f"{_rel(page)}, block at line {line}"
        try:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 (our own docs)
        except Exception:  # report which block of which page failed, with its traceback
            pytest.fail(f"{where} failed:\n{code}\n{traceback.format_exc()}", pytrace=False)


def test_the_docs_have_runnable_examples():
    counts = {_rel(p): len(python_blocks(p)) for p in PAGES}
    for page in ("README.md", "docs/getting-started.md", "docs/language.md", "docs/compiler.md",
                 "docs/migration.md", "docs/catalog.md"):
        assert counts.get(page, 0) > 0, f"{page} has no ```python block: {counts}"


def test_every_code_fence_is_closed_and_python_is_spelled_python():
    for page in PAGES:
        fences = FENCE.findall(page.read_text())
        assert len(fences) % 2 == 0, f"{_rel(page)}: an unclosed ``` fence"
        openers = fences[0::2]
        assert not {"py", "python3", "pycon"} & set(openers), (
            f"{_rel(page)}: write ```python so the block is run by this test, got {openers}")


def test_generated_blocks_match_their_generators():
    make_docs = _make_docs()
    make_docs.check_coverage()
    stale = make_docs.stale_blocks(cheap_only=True)
    assert not stale, (f"generated blocks out of date: {stale}; run "
                       f"`python scripts/make_docs.py` and commit the result")


def test_every_generated_picture_exists():
    make_docs = _make_docs()
    made = make_docs.make_blocks([name for name, b in make_docs.BLOCKS.items() if b.cheap])
    assert made
    missing = [name for name in make_docs.PICTURES if not (DOCS / "images" / name).is_file()]
    assert not missing, f"pictures not generated yet: {missing}; run `python scripts/make_docs.py`"


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s#]+\.md)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_image_and_local_link_exists(page: Path):
    text = page.read_text()
    missing = []
    for m in IMAGE.finditer(text):
        target = m.group(1) or m.group(2)
        if not re.match(r"https?://", target) and not (page.parent / target).is_file():
            missing.append(target)
    for m in LINK.finditer(text):
        if not re.match(r"https?://", m.group(1)) and not (page.parent / m.group(1)).is_file():
            missing.append(m.group(1))
    assert not missing, f"{_rel(page)} refers to missing files: {missing}"


def test_every_results_file_names_its_run():
    runs = json.loads((RESULTS / "runs.json").read_text())
    files = {p.name for p in RESULTS.glob("*.json")} - {"runs.json"}
    assert set(runs) == files, f"described but missing: {set(runs) - files}; undescribed: {files - set(runs)}"
    for name, run in runs.items():
        for key in ("date", "commit", "device", "software", "command", "what"):
            assert run.get(key), f"runs.json: {name} has no {key!r}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run["date"]) and re.fullmatch(r"[0-9a-f]{7,40}", run["commit"])


def test_generators_use_the_public_api_only():
    sources = sorted((ROOT / "scripts" / "docgen").glob("*.py")) + [ROOT / "scripts" / "make_docs.py"]
    for path in sources:
        text = path.read_text()
        private = re.findall(r"from sparsedsl\.(?!cli\b)[\w.]+ import|import sparsedsl\.(?!cli\b)\w|\bsd\.\w+\._|\.(?:_\w+computed\w*)\(", text)
        assert not private, f"{_rel(path)} reaches into sparsedsl's internals: {private}"
        assert not re.search(r"DOCS / \"\w+\.md\"\)\.read_text", text), (
            f"{_rel(path)} reads numbers from a page; read benchmarks/results/ instead")


#: Words about how the pages were made, not about the product.
PROCESS_WORDS = re.compile(r"\bsession\b|\bissue \d|issue's|DESIGN\.md|shared/|work period|the seed\b|notes\.md",
                           re.I)
PRODUCT_PAGES = ["README.md", "docs/index.md", "docs/getting-started.md", "docs/language.md",
                 "docs/counting.md", "docs/catalog.md", "docs/migration.md", "docs/performance.md",
                 "benchmarks/results/README.md"]


@pytest.mark.parametrize("page", PRODUCT_PAGES)
def test_pages_speak_of_the_product(page):
    text = (ROOT / page).read_text()
    found = sorted({m.group(0) for m in PROCESS_WORDS.finditer(text)})
    assert not found, f"{page} speaks of how it was made: {found}"


def test_the_readme_starts_with_the_set_up_commands_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)\n```", readme, re.S | re.M)
    assert "sparsedsl demo" in blocks[0] and "pytest" in blocks[1]
    assert readme.index(blocks[1]) < readme.index("## ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci
