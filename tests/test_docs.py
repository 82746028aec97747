"""The documentation: a short README, links that resolve, and the commands of the README and the guides as written.

Everything is read from the files themselves (links, commands, the console scripts of pyproject.toml), so the
tests follow the code when modules move.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")  # [text](target), ![alt](target)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings are what they look like."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")  # link text and code as plain text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", markdown.read_text())):
        anchor = github_anchor(heading)
        result.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")  # GitHub numbers repeats
        seen[anchor] = seen.get(anchor, 0) + 1
    return result


def broken_links(markdown: Path) -> tuple[list[str], int]:
    """(every relative link of `markdown` that does not resolve, with why; the number of relative links)."""
    broken, checked = [], 0
    for target in LINK.findall(prose(markdown.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not ours to check offline
            continue
        checked += 1
        path_part, _, anchor = target.partition("#")
        path = (markdown.parent / path_part).resolve() if path_part else markdown
        if not path.exists():
            broken.append(f"{markdown.name}: ({target}): {path_part} does not exist")
        elif anchor and path.suffix != ".md":
            broken.append(f"{markdown.name}: ({target}): an anchor into a file that is not Markdown")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{markdown.name}: ({target}): no heading #{anchor} in {path.name}")
    return broken, checked


def test_github_anchors_as_github_makes_them():
    assert github_anchor("Weights & Biases") == "weights--biases"
    assert github_anchor("Import the authors' models") == "import-the-authors-models"
    assert github_anchor("Python: `dfl.Denoiser`") == "python-dfldenoiser"
    assert github_anchor("Set-up: two commands") == "set-up-two-commands"
    assert github_anchor("Real datasets: `dfl-prepare`") == "real-datasets-dfl-prepare"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "guide.md").write_text("# A guide\n\n## Its part\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](guide.md) [ok](guide.md#its-part) [ok](#top) [web](https://example.org/x)\n"
                    "[gone](missing.md) [bad](guide.md#not-a-heading) [bad](#nowhere) `[code](no.md)`\n"
                    "# Top\n")  # fmt: skip
    broken, checked = broken_links(page)
    assert checked == 6
    assert len(broken) == 3 and "missing.md" in broken[0], broken
    assert "#not-a-heading" in broken[1] and "#nowhere" in broken[2], broken


@pytest.mark.parametrize("markdown", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(markdown):
    broken, checked = broken_links(markdown)
    assert not broken, "\n".join(broken)
    assert checked > 0, f"{markdown.name} links nowhere: link the README or the guide it belongs to"


def test_readme_is_short_and_links_every_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(prose(README.read_text()))}
    for guide in [*sorted((REPO / "docs").glob("*.md")), REPO / "CONTRIBUTING.md"]:
        assert guide.resolve() in linked, f"README.md does not link {guide.relative_to(REPO)}"


# --- the README's shell commands ---------------------------------------------------------------------------

def console_scripts() -> dict[str, str]:
    """Command name -> "module:function", as pyproject.toml installs them."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def shell_commands(markdown: Path) -> list[list[str]]:
    """Every command line of `markdown`'s bash blocks that runs one of dfl's console scripts, as argv."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in console_scripts():
                commands.append(argv)
    return commands


def run_script(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs console script `name` as its installed wrapper would, with this checkout's code."""
    module, function = console_scripts()[name].split(":")
    code = f"import sys; from {module} import {function} as main; sys.argv = {[name, *args]!r}; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})  # fmt: skip


def sweep_points(argv: list[str]) -> list[list[str]]:
    """A `-m` sweep's single runs (`loss=a,b` -> `loss=a`, `loss=b`); other commands unchanged."""
    if "-m" not in argv and "--multirun" not in argv:
        return [argv]
    runs = [[]]
    for arg in (a for a in argv if a not in ("-m", "--multirun")):
        key, eq, values = arg.partition("=")
        choices = values.split(",") if eq and "," in values and not values.startswith("[") else [values]
        runs = [[*run, f"{key}={v}" if eq else arg] for run in runs for v in choices]
    return runs


def test_every_console_script_answers_help(tmp_path):
    assert "dfl-train" in console_scripts()
    for name in console_scripts():
        proc = run_script(name, ["--help"], tmp_path)
        assert proc.returncode == 0, f"{name} --help: {proc.stderr[-2000:]}"
        assert "usage:" in proc.stdout or "Powered by Hydra" in proc.stdout, f"{name} --help: {proc.stdout[:500]}"


@pytest.mark.parametrize("markdown", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_the_docs_name_is_installed(markdown):
    named = set(re.findall(r"(?<![\w./-])dfl-[a-z][a-z-]*[a-z]", markdown.read_text()))
    unknown = named - set(console_scripts())
    assert not unknown, f"{markdown.name} names commands pyproject.toml does not install: {sorted(unknown)}"


def same_value(composed, override: str) -> bool:
    """Whether a composed config value is what the command line said (`3e-4` is Hydra's 0.0003)."""
    try:
        return float(composed) == float(override)
    except (TypeError, ValueError):
        return str(composed) == str(yaml.safe_load(override))


def check_command(argv: list[str], where: str, cwd: Path) -> None:
    """argparse commands parse as written; Hydra commands compose (`--cfg job`) with each override applied."""
    module = importlib.import_module(console_scripts()[argv[0]].split(":")[0])
    if hasattr(module, "build_parser"):  # argparse: the options exist and take what the docs give them
        args = [a.strip("[]") for a in argv[1:]]  # `[--device cuda]`: an optional part, shown
        args = [a for i, a in enumerate(args) if a != "|" and (i == 0 or args[i - 1] != "|")]  # `a | b`: a
        try:
            module.build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse (its error is printed above)")
        return
    for run in sweep_points(argv):
        proc = run_script(run[0], [*run[1:], "--cfg", "job"], cwd)
        assert proc.returncode == 0, f"{where}: `{shlex.join(run)} --cfg job`: {proc.stderr[-2000:]}"
        config = yaml.safe_load(proc.stdout)
        for override in run[1:]:
            key, _, value = override.lstrip("+").partition("=")
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):  # a value (a group choice composes a node)
                assert same_value(node, value), f"{where}: `{shlex.join(run)}`: {key} is {node}"


def test_the_readmes_commands_parse_and_compose(tmp_path):
    commands = shell_commands(README)
    assert {argv[0] for argv in commands} >= {"dfl-train", "dfl-eval", "dfl-denoise", "dfl-prepare", "dfl-import-tf"}
    for argv in commands:
        check_command(argv, "README.md", tmp_path)
    assert not list(tmp_path.iterdir()), "--cfg job must not write into the working directory"


@pytest.mark.parametrize("markdown", [p for p in DOCS[1:] if shell_commands(p)], ids=lambda p: p.name)
def test_the_guides_commands_parse_and_compose(markdown, tmp_path):
    """The same for the guides, except commands with a `...` placeholder for the reader's own settings."""
    runnable = [argv for argv in shell_commands(markdown) if "..." not in argv]
    assert runnable
    for argv in runnable:
        check_command(argv, markdown.name, tmp_path)


# --- the README's project structure ------------------------------------------------------------------------

def structure_paths() -> list[str]:
    """The paths the README's "Project structure" block names (`dfl/` then its indented entries)."""
    section = README.read_text().split("## Project structure", 1)[1]
    block = re.search(r"^```\n(.*?)^```", section, re.M | re.S).group(1)
    paths, parent = [], ""
    for line in block.splitlines():
        m = re.match(r"^( *)([\w.-]+/?)", line)
        if not m:
            continue  # a description's continuation line
        if m.group(1):
            paths.append(parent + m.group(2))
        else:
            parent = m.group(2) if m.group(2).endswith("/") else ""
            paths.append(m.group(2))
    return paths


def test_the_readmes_project_structure_is_the_repository():
    named = structure_paths()
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, f"README.md's project structure names what does not exist: {missing}"
    packages = sorted(f"dfl/{d.name}/" for d in (REPO / "dfl").iterdir() if (d / "__init__.py").is_file())
    top = ["conf/", "dfl/", "datamodules/", "callbacks/", "tests/", "docs/"]
    unnamed = [p for p in top + packages if p not in named]
    assert not unnamed, f"README.md's project structure leaves out {unnamed}"
