"""The project explains itself: no file sends the reader outside the checkout for its design, and the design page
(docs/design.md) names only paths, modules and README sections that exist, so it cannot rot unnoticed."""

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = "docs/design.md"

# Pointers to design material outside the checkout (the design notes, the paper, the notes beside it); the project's
# own page is docs/design.md. Built from pieces so that this file does not match itself.
_SHARED = r"\.\./" + "shared"
OUTSIDE = re.compile("|".join([
    _SHARED + r"(?!/data\b)",  # anything beside the checkout but the data folder
    r"shared/(?:DESIGN|reference|hooks)\b",
    r"\bDESIGN" + r"\.md\b",
    r"reference/" + r"NOTES\b",
    r"PA-CLIP-" + r"paper\b",
]))
# The real images beside the checkout: only what reads data may name them (tests, benchmarks, the README's benchmark
# commands, run.sh's evaluate default, CI that places them, the pytest marker of the data tier).
DATA = re.compile(_SHARED + r"/data\b")
DATA_ALLOWED = ("tests/", "benchmarks/", "README.md", "run.sh", ".ci/run", "pyproject.toml")

TOP_LEVEL = ("postprocess", "export", "serve", "client", "cli", "tests", "benchmarks", "model_repository", "docs", ".ci")
# a repository path written in the design page: top-level folder, then path characters (globs allowed)
PATH = re.compile(r"(?<![\w./<>-])((?:%s)/[\w./*-]*[\w*/])" % "|".join(re.escape(t) for t in TOP_LEVEL))
ROOT_FILE = re.compile(r"`(README\.md|run\.sh|pyproject\.toml)`")
MODULE = re.compile(r"python -m ([A-Za-z_][\w.]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def project_files() -> list[str]:
    """Tracked files plus new ones git does not ignore (what the next commit may hold), as they are on disk."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err})")
    return sorted({f for f in out.splitlines() if f and (ROOT / f).is_file()})


def text_files() -> dict[str, str]:
    texts = {}
    for name in project_files():
        if name.startswith("docs/images/"):
            continue
        data = (ROOT / name).read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        texts[name] = data.decode("utf-8", errors="replace")
    return texts


def outside_references(name: str, text: str) -> list[str]:
    """``file:line: text`` of every reference in ``text`` that points outside the checkout where it may not."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        bad = bool(OUTSIDE.search(line)) or (bool(DATA.search(line)) and not name.startswith(DATA_ALLOWED))
        if bad:
            found.append(f"{name}:{number}: {line.strip()}")
    return found


def test_nothing_refers_to_design_material_outside_the_checkout():
    texts = text_files()
    assert DESIGN in texts, f"{DESIGN} is missing"
    found = [hit for name, text in texts.items() if name != "tests/test_docs.py"
             for hit in outside_references(name, text)]
    assert not found, ("these lines point outside the checkout (the design is docs/design.md; only what reads data "
                       "may name the data folder):\n" + "\n".join(found))


def test_the_check_sees_what_it_must():
    assert outside_references("README.md", "PA-CLIP (" + "../" + "shared/DESIGN.md)")
    assert outside_references("postprocess/x.py", '"""Scoring (' + "DESIGN" + '.md steps 2-9)."""')
    assert outside_references(".ci/run", "# fresh clone, " + "../" + "shared beside it")
    assert outside_references("serve/x.py", "DATA = '" + "../" + "shared/data'")
    assert not outside_references("benchmarks/x.py", "--data " + "../" + "shared/data/ball_screw")
    assert not outside_references("README.md", "see docs/design.md; shared memory")


# -- the design page's own references ----------------------------------------------------------------------------
def _exists(path: str, files: list[str]) -> bool:
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        return any(fnmatch.fnmatch(f, path) or fnmatch.fnmatch(f, path + "/*") for f in files)
    return path in files or any(f.startswith(path + "/") for f in files)


def _module_exists(module: str, files: list[str]) -> bool:
    base = module.replace(".", "/")
    return f"{base}.py" in files or f"{base}/__main__.py" in files or f"{base}/__init__.py" in files


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not fenced:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(name: str, text: str, files: list[str]) -> list[str]:
    """Relative Markdown links of ``name`` whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = name if not file_part else (Path(name).parent / file_part).as_posix()
        resolved = os_normpath(resolved)
        if resolved.startswith("../") or not _exists(resolved, files):
            broken.append(f"{name}: link to {target} (no {resolved} in the repository)")
        elif fragment and resolved.endswith(".md") and fragment not in anchors((ROOT / resolved).read_text()):
            broken.append(f"{name}: link to {target} (no heading #{fragment} in {resolved})")
    return broken


def os_normpath(path: str) -> str:
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and parts and parts[-1] != "..":
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def test_the_design_page_names_only_what_exists():
    files = project_files()
    assert DESIGN in files, f"{DESIGN} is missing"
    text = (ROOT / DESIGN).read_text()
    missing = [p for p in sorted(set(PATH.findall(text)) | set(ROOT_FILE.findall(text))) if not _exists(p, files)]
    missing += [f"python -m {m}" for m in sorted(set(MODULE.findall(text))) if not _module_exists(m, files)]
    missing += broken_links(DESIGN, text, files)
    assert not missing, f"{DESIGN} names what the repository does not have:\n" + "\n".join(missing)
    # the page is found from the README
    assert "docs/design.md" in (ROOT / "README.md").read_text()


def test_the_path_check_sees_what_it_must():
    files = ["postprocess/kernels.py", "postprocess/cuda/knn.cu", "docs/deploy.md", "README.md", "serve/__main__.py"]
    assert PATH.findall("see `postprocess/kernels.py` and postprocess/cuda/*.cu.") == ["postprocess/kernels.py",
                                                                                       "postprocess/cuda/*.cu"]
    assert _exists("postprocess/cuda/*.cu", files) and _exists("postprocess/cuda/", files)
    assert not _exists("postprocess/gone.py", files)
    assert _module_exists("serve", files) and not _module_exists("benchmarks.gone", files)
    assert broken_links("docs/design.md", "[x](deploy.md) [y](../README.md)", files) == []
    assert broken_links("docs/design.md", "[x](gone.md)", files)


def test_markdown_links_in_the_project_resolve():
    files = project_files()
    broken = [hit for name in files if name.endswith(".md")
              for hit in broken_links(name, (ROOT / name).read_text(), files)]
    assert not broken, "\n".join(broken)


def test_every_exported_metric_is_named_in_the_readme():
    """Each series postprocess/telemetry.py exports is named in full in the README (its Metrics or Drift part)."""
    from postprocess.telemetry import METRICS

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in METRICS if not re.search(rf"`{re.escape(name)}[`{{]", readme)]
    assert not missing, f"exported on /metrics but not named in README.md: {missing}"
