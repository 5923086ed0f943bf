"""The documentation says what the code does: every link, command, path and name in it is real.

The pages: ``README.md`` and ``docs/*.md`` (ours), and ``k8s/README.md`` (its links,
commands and ``FLOTILLA_`` variables). Nothing here runs a command; each check reads the
page and asks the code:

- a relative link (or image) points at a file that exists, and its ``#anchor`` at a
  heading of that page (GitHub's anchors);
- a command in a ``sh`` block is real: ``make X`` a target of the Makefile; ``flotilla ...``
  parses with the CLI's own parser (``flotilla.cli.build_parser``), flags, choices and
  values included, with the placeholders a synopsis uses (``NAME``, ``[--opt V]``,
  ``{a|b}``, ``a|b``) filled in; ``python -m MOD`` an importable module (parsed, where it
  has a ``build_parser``); ``pytest`` markers and paths that exist; any other program one
  of the few named here; every repository path an argument names exists;
- a ``python`` block compiles (top-level ``await`` allowed) and what it imports exists;
  a ``yaml`` block is a valid configuration or model spec;
- a path in inline code (``services/router/``) exists; a dotted ``flotilla.*`` name is a
  module, an attribute of one or a service or message of the protos; a setting's dotted
  name (``pools.strategy``, ``models.<name>.batching.max_batch_size``, ``input.dtype``)
  and a ``FLOTILLA_*`` variable name a field of the settings classes;
- every fenced block of our pages says its language (a block without one escapes the checks);
- the README stays a front page: at most 300 lines, and ``make run`` and ``make test`` the
  only commands it gives as the way in;
- ``docs/configuration.md`` is what ``python -m flotilla.docs`` writes; the model spec's
  table names every key of ``ModelSettings``; ``docs/architecture.md``'s layout names each
  module of the folders it describes, its picture every package, and every import between
  packages is one its table allows;
- ``make bench`` writes its tables into ``docs/benchmarks.md``, which holds its markers once.

The checks return what they found wrong; the last tests show they find a broken link, a
made-up flag and a misspelt setting.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import itertools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from flotilla import docs as docs_generator
from flotilla.cli import build_parser
from flotilla.config import FlotillaSettings, ModelSettings

REPO = Path(__file__).resolve().parents[1]
OUR_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES = [*OUR_PAGES, REPO / "k8s" / "README.md"]
FENCE_LANGUAGES = {"sh", "python", "text", "yaml", "mermaid"}
REPO_DIRS = ("flotilla", "services", "clients", "tests", "protos", "observability", "k8s", "bench", "docs")
"""Top-level folders of the repository: a path that starts with one must exist (build/, .flotilla/ are made at run time)."""
EXTERNAL_PROGRAMS = {"kubectl", "helm", "docker", "kind", "cat", "chmod", "cd", "export", "curl", "promtool",
                     "git", "openssl", "apt-get", "echo"}
PLACEHOLDERS = {
    "NAME": "lite0-copy", "DIR": "build/models/efficientnet-lite0", "FILE": "flotilla.yaml", "N": "1",
    "M": "efficientnet-lite0", "V": "1", "S": "1.0", "REV": "main", "LIST": "1,2", "IMAGE...": "a.jpg",
    "HOST:PORT": "127.0.0.1:1",
}
"""What each placeholder of a synopsis becomes before the line is parsed."""
FILE_SUFFIXES = (".proto", ".py", ".yaml", ".yml", ".json", ".jsonl", ".md", ".txt", ".jpg", ".png", ".onnx",
                 ".csv", ".toml", ".env", ".crt", ".key")
NOT_SETTINGS = {"FLOTILLA_API_KEY", "FLOTILLA_ADMIN_KEY"}
"""``FLOTILLA_`` variables that are not settings: ``flotilla infer``'s API key, the CLI's admin key."""


def rel(page: Path) -> str:
    return str(page.relative_to(REPO))


# -- reading Markdown ------------------------------------------------------------------

FENCE = re.compile(r"^( *)(```+|~~~+)[ \t]*([\w-]*)[^\n]*\n(.*?)^\1\2[ \t]*$", re.M | re.S)


def fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, the body's indentation removed."""
    found = []
    for match in FENCE.finditer(text):
        indent = len(match.group(1))
        body = "\n".join(line[indent:] for line in match.group(4).splitlines())
        found.append((match.group(3).lower(), body))
    return found


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().rstrip("#").strip())
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def tables(text: str, header: str) -> list[list[str]]:
    """The rows (cells split) of the table whose header line starts with ``header``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]])
            return rows
    raise AssertionError(f"no table with the header {header!r}")


# -- links -------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def link_problems(page: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in anchors(text):
                problems.append(f"{rel(page)}: link to {target}: no such heading on this page")
            continue
        file = (page.parent / path).resolve()
        if not file.exists():
            problems.append(f"{rel(page)}: link to {target}: {path} does not exist")
        elif anchor and file.suffix == ".md":
            if anchor not in anchors(file.read_text(encoding="utf-8")):
                problems.append(f"{rel(page)}: link to {target}: no heading #{anchor} in {file.name}")
    return problems


# -- commands ----------------------------------------------------------------------------

def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return {m for line in text.splitlines() for m in re.findall(r"^([\w.\-]+)\s*:(?!=)", line)}


def pytest_markers() -> set[str]:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return set(re.findall(r'^\s*"(\w+):', text, re.M))


def expand_synopsis(line: str) -> list[str]:
    """A synopsis line as lines to parse: ``[...]`` unwrapped, each ``{a|b}`` / ``a|b`` alternative its
    own line, placeholders filled in."""
    while re.search(r"\[[^\[\]]*\]", line):
        line = re.sub(r"\[([^\[\]]*)\]", r"\1", line)
    words = line.split()
    options = [re.sub(r"^\{(.*)\}$", r"\1", w).split("|") if "|" in w.strip("|") else [w] for w in words]
    expanded = []
    for choice in itertools.product(*options):
        filled = [PLACEHOLDERS.get(w, w) for w in choice]
        text = " ".join(filled)
        for name, value in PLACEHOLDERS.items():
            text = re.sub(rf"(?<=/){re.escape(name)}\b", value, text)  # s3://bucket/NAME
        expanded.append(text)
    return expanded


def shell_lines(block: str) -> Iterator[str]:
    """The command lines of a shell block: continuations joined, comments and heredoc bodies left out."""
    lines = iter(block.replace("\\\n", " ").splitlines())
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", line)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        yield line


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a line (split at ; && || | &), redirections left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    words: list[str] = []
    skip = False
    for token in lexer:
        if token in {";", "&&", "||", "|", "&"}:
            if words:
                yield words
            words = []
        elif token in {">", ">>", "<", "<<", "<<-", "2>", ">&"}:
            skip = True
        elif skip:
            skip = False
        else:
            words.append(token)
    if words:
        yield words


def parse_problem(parser: Any, argv: list[str]) -> str | None:
    """What argparse says about ``argv``, or None when it parses."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1]
    return None


def argument_path_problems(words: list[str]) -> list[str]:
    problems = []
    for word in words:
        value = word.split("=", 1)[-1]
        if value.split("/", 1)[0] in REPO_DIRS and "/" in value and "<" not in value:
            if not any(REPO.glob(value.rstrip("/"))):
                problems.append(f"{value} does not exist")
    return problems


def command_problems(line: str) -> list[str]:
    """What is wrong with one command line of a shell block (empty: it is real)."""
    problems = []
    head = re.match(r"\s*(?:\w+=\S*\s+)*(\S+)", line)
    program = head.group(1) if head else ""
    is_ours = re.search(r"(^|/)(flotilla|python3?|make)$", program) is not None
    for expanded in expand_synopsis(line) if is_ours else [line]:
        for words in simple_commands(expanded):
            problems += [f"{line}: {p}" for p in one_command_problems(words)]
    return problems


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent that is no package
        return False


def one_command_problems(words: list[str]) -> list[str]:
    problems = []
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        problems += setting_env_problems(words.pop(0).split("=", 1)[0])
    if not words:
        return problems
    program, args = words[0], words[1:]
    problems += argument_path_problems(args)
    name = program.rsplit("/", 1)[-1]
    if name in ("python", "python3") and args[:1] == ["-m"]:
        module, args = args[1], args[2:]
        if module == "flotilla":
            name = "flotilla"
        elif not module_exists(module):
            return [*problems, f"no module {module}"]
        else:
            parser = getattr(importlib.import_module(module), "build_parser", None)
            problem = parse_problem(parser(), args) if parser else None
            return [*problems, *([f"python -m {module}: {problem}"] if problem else [])]
    if name == "flotilla":
        problem = parse_problem(build_parser(), args)
        problems += [f"flotilla: {problem}"] if problem else []
    elif name == "make":
        problems += [f"no make target {t!r}" for t in args if "=" not in t and not t.startswith("-")
                     and t not in make_targets()]
    elif name == "pytest":
        for i, arg in enumerate(args):
            if i and args[i - 1] == "-m":
                problems += [f"no pytest marker {m!r}" for m in re.findall(r"\w+", arg)
                             if m not in {"and", "or", "not"} and m not in pytest_markers()]
            elif not arg.startswith("-") and not (REPO / arg.split("::")[0]).exists():
                problems.append(f"{arg} does not exist")
    elif name not in EXTERNAL_PROGRAMS:
        problems.append(f"{program}: not a command these pages may show (add it to EXTERNAL_PROGRAMS if it is real)")
    return problems


def page_command_problems(page: Path, text: str) -> list[str]:
    return [f"{rel(page)}: {problem}" for language, body in fences(text) if language in {"sh", "bash", "shell"}
            for line in shell_lines(body) for problem in command_problems(line)]


# -- names: settings, modules, paths ---------------------------------------------------------

def setting_problem(root: type[BaseModel], parts: list[str]) -> str | None:
    """None when ``parts`` names a setting of ``root``, or a section (``*`` after it)."""
    model, i = root, 0
    while i < len(parts):
        if parts[i] == "*":
            return None
        field = model.model_fields.get(parts[i])
        if field is None:
            return f"{'.'.join(parts)}: {model.__name__} has no {parts[i]!r}"
        nested = docs_generator.section_model(field.annotation)
        i += 1
        if nested is None:
            return None if i == len(parts) else f"{'.'.join(parts[:i])} has no settings under it"
        model, keyed = nested
        if keyed and i < len(parts):
            i += 1  # the map's key: <name>, or a model's own name
    return None


def setting_env_problems(variable: str) -> list[str]:
    if not variable.startswith("FLOTILLA_") or variable in NOT_SETTINGS or variable == "FLOTILLA_":
        return []
    parts = [p.lower() or "*" for p in variable.removeprefix("FLOTILLA_").split("__")]  # X__<SETTING>: X.*
    problem = setting_problem(FlotillaSettings, parts)
    return [f"{variable}: {problem}"] if problem else []


SETTING = re.compile(r"^[a-z][a-z0-9_]*(\.([a-z][a-z0-9_]*|<name>|\*))+$")


def name_problems(text: str) -> list[str]:
    """Settings, FLOTILLA_ variables and flotilla.* names in the page that name nothing."""
    problems = []
    for variable in set(re.findall(r"\bFLOTILLA_[A-Z0-9_]*\*?", text)):
        problems += setting_env_problems(variable)
    for span in set(code_spans(text)):
        if span.endswith(FILE_SUFFIXES):
            continue
        first = span.split(".")[0]
        if SETTING.match(span) and first in FlotillaSettings.model_fields:
            problems += [f"`{span}`: {p}" for p in [setting_problem(FlotillaSettings, span.split("."))] if p]
        elif SETTING.match(span) and first in ModelSettings.model_fields:
            problems += [f"`{span}`: {p}" for p in [setting_problem(ModelSettings, span.split("."))] if p]
        elif re.match(r"^flotilla(\.[A-Za-z_]\w*)+$", span):
            problems += [f"`{span}`: {p}" for p in [python_name_problem(span)] if p]
    return problems


def python_name_problem(dotted: str) -> str | None:
    if "__main__" in dotted:  # importing it would run it
        return None if module_exists(dotted) else "no such module"
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        module = ".".join(parts[:end])
        try:
            found: Any = importlib.import_module(module)
        except ImportError:
            continue
        for attr in parts[end:]:
            if module == "flotilla.api.v1" and len(parts) == end + 1 and proto_name_exists(attr):
                return None
            if not hasattr(found, attr):
                return f"{module} has no {attr!r}"
            found = getattr(found, attr)
        return None
    return "no such module"


def proto_name_exists(name: str) -> bool:
    text = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "protos").rglob("*.proto"))
    return re.search(rf"^\s*(service|message|enum)\s+{re.escape(name)}\b", text, re.M) is not None


def path_problems(text: str) -> list[str]:
    problems = []
    for span in set(code_spans(text)):
        if re.match(r"^[\w.\-/*]+$", span) and "/" in span and span.split("/", 1)[0] in REPO_DIRS:
            if not any(REPO.glob(span.rstrip("/"))):
                problems.append(f"`{span}` does not exist")
    return problems


# -- the tests ------------------------------------------------------------------------------------

def page_id(page: Path) -> str:
    return rel(page)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page: Path) -> None:
    assert link_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_are_real(page: Path) -> None:
    assert page_command_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_settings_and_names_exist(page: Path) -> None:
    assert name_problems(page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", OUR_PAGES, ids=page_id)
def test_paths_exist(page: Path) -> None:
    assert path_problems(page.read_text(encoding="utf-8")) == []


def written_by_the_bench(text: str) -> str:
    """The page without the blocks ``make bench`` writes (between its start and end markers)."""
    return re.sub(r"<!-- (bench[\w-]*):start -->.*?<!-- \1:end -->", "", text, flags=re.S)


@pytest.mark.parametrize("page", OUR_PAGES, ids=page_id)
def test_every_block_says_its_language(page: Path) -> None:
    """(Not what ``make bench`` writes: its tables come and go with each run.)"""
    unknown = [language or "(none)" for language, _ in fences(written_by_the_bench(page.read_text(encoding="utf-8")))
               if language not in FENCE_LANGUAGES]
    assert unknown == [], f"{rel(page)}: fences must name one of {sorted(FENCE_LANGUAGES)}"


@pytest.mark.parametrize("page", OUR_PAGES, ids=page_id)
def test_python_blocks_compile_and_import_what_exists(page: Path) -> None:
    problems = []
    for language, body in fences(page.read_text(encoding="utf-8")):
        if language != "python":
            continue
        tree = compile(body, rel(page), "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                problems += [f"from {node.module} import {a.name}: {p}" for a in node.names
                             for p in [python_name_problem(f"{node.module}.{a.name}")] if p]
            elif isinstance(node, ast.Import):
                problems += [f"import {a.name}: no such module" for a in node.names if not module_exists(a.name)]
    assert problems == []


@pytest.mark.parametrize("page", OUR_PAGES, ids=page_id)
def test_yaml_blocks_are_valid_settings(page: Path) -> None:
    problems = []
    for language, body in fences(page.read_text(encoding="utf-8")):
        if language != "yaml":
            continue
        data = yaml.safe_load(body)
        errors = []
        for schema in (FlotillaSettings, ModelSettings):
            try:
                schema.model_validate(data)
                break
            except ValidationError as exc:
                errors.append(f"as {schema.__name__}: {exc}")
        else:
            problems.append(f"{body.splitlines()[0]} ...: " + "; ".join(errors))
    assert problems == []


def test_the_readme_is_a_front_page() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "## Two commands" in text
    made = {words[1] for language, body in fences(text) if language == "sh"
            for line in shell_lines(body) for words in simple_commands(line) if words[0] == "make"}
    assert made == {"run", "test"}, "the README gives `make run` and `make test`, and no other make target"


def test_the_configuration_reference_is_current() -> None:
    written = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == docs_generator.render(REPO / "flotilla.yaml"), "stale: run `make docs` (python -m flotilla.docs)"


def model_spec_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        nested = docs_generator.section_model(field.annotation)
        keys |= model_spec_keys(nested[0], f"{prefix}{name}.") if nested else {f"{prefix}{name}"}
    return keys


def test_the_model_spec_table_names_every_key() -> None:
    named = set()
    for row in tables((REPO / "docs" / "model-spec.md").read_text(encoding="utf-8"), "| key | default | meaning |"):
        section = ""
        for span in re.findall(r"`([^`]+)`", row[0]):
            if span.startswith("."):
                span = section + span
            section = span.rsplit(".", 1)[0] if "." in span else ""
            named.add(span)
    assert named == model_spec_keys(ModelSettings)


def test_the_layout_names_the_files_there_are() -> None:
    """A row of docs/architecture.md's layout that names modules (``routing.py``) names each module and
    subpackage of its folder, and nothing that is not there."""
    missing, unnamed = [], []
    for row in tables((REPO / "docs" / "architecture.md").read_text(encoding="utf-8"), "| path | what |"):
        folders = re.findall(r"`([^`]+/)`", row[0])
        names = set(re.findall(r"`([\w.]+\.py|\w+/)`", row[1]))
        if len(folders) != 1 or not any(n.endswith(".py") for n in names):
            continue
        folder = REPO / folders[0]
        missing += [f"{folders[0]}{n}" for n in sorted(names) if not (folder / n).exists()]
        there = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
        there |= {f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").exists()}
        unnamed += [f"{folders[0]}{n}" for n in sorted(there - names)]
    assert missing == [], "the layout names what is not there"
    assert unnamed == [], "the layout leaves these out"


# -- imports against docs/architecture.md ---------------------------------------------------------

SOURCE_ROOTS = {"flotilla": REPO / "flotilla", "flotilla.services": REPO / "services",
                "flotilla.clients": REPO / "clients"}


def source_modules() -> dict[str, Path]:
    modules = {}
    for prefix, root in SOURCE_ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join([prefix, *parts])] = path
    return modules


def import_rules() -> dict[str, set[str]]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = tables(text, "| package | what it is | may import |")
    return {re.findall(r"`([^`]+)`", row[0])[0]: set(re.findall(r"`([^`]+)`", row[2])) for row in rows}


def owner(module: str, rules: dict[str, set[str]]) -> str | None:
    """The row of the rules table a module belongs to (the longest package that holds it)."""
    holders = [p for p in rules if module == p or module.startswith(p + ".")]
    return max(holders, key=len) if holders else None


def import_problems(rules: dict[str, set[str]]) -> list[str]:
    modules = source_modules()
    problems = []
    for module, path in sorted(modules.items()):
        source = owner(module, rules)
        if source is None and path.name != "__init__.py":  # a namespace's __init__ importing nothing is no package
            problems.append(f"{module} is in no package of the table")
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(filter(None, [*parent, base]))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if not name.startswith("flotilla"):
                    continue
                target = owner(name, rules) or owner(name.rsplit(".", 1)[0], rules)
                if source is None:
                    problems.append(f"{module} ({rel(path)}:{node.lineno}) imports {name} but is in no package of the table")
                elif target is not None and target != source and target not in rules[source]:
                    problems.append(f"{module} ({rel(path)}:{node.lineno}) imports {name}: "
                                    f"docs/architecture.md does not let {source} import {target}")
    return problems


def test_imports_follow_the_architecture_table() -> None:
    assert import_problems(import_rules()) == []


def test_the_architecture_picture_shows_every_package() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    picture = "\n".join(body for language, body in fences(text) if language == "mermaid")
    missing = [p for p in import_rules() if p not in picture and p not in {"flotilla.__main__"}]
    assert missing == []


# -- the checks find what is wrong -------------------------------------------------------------

def test_a_broken_link_is_found() -> None:
    page = REPO / "docs" / "example.md"
    found = link_problems(page, "[a](architecture.md) [b](no-such-page.md) [c](architecture.md#no-such-heading)"
                                "\n\n## A heading\n\n[d](#a-heading) [e](#nothing-here)")
    assert len(found) == 3 and all(("no-such" in p or "nothing-here" in p) for p in found), found


def test_a_made_up_command_is_found() -> None:
    assert command_problems(".venv/bin/flotilla models deploy x --storage-uri s3://b/x --memory 300Mi") == []
    assert command_problems(".venv/bin/flotilla models deploy x --made-up-flag 1")
    assert command_problems(".venv/bin/flotilla models redeploy x")
    assert command_problems(".venv/bin/flotilla models deploy x --memory 300parsecs")
    assert command_problems(".venv/bin/flotilla top [--made-up]")
    assert command_problems("make run-everything")
    assert command_problems("flotillactl up")
    assert command_problems("python -m flotilla.no_such_module")
    assert command_problems("python -m no_such_package.module")
    assert command_problems("python -m flotilla.docs --no-such-flag")
    assert command_problems("kubectl apply -k k8s/overlays/no-such-overlay")


def test_a_wrong_name_is_found() -> None:
    assert name_problems("`pools.strategy` `models.<name>.batching.max_batch_size` `input.dtype` "
                         "`controller.autoscale.*` FLOTILLA_TRITON__REPLICAS `flotilla.config.ModelSettings` "
                         "`flotilla.api.v1.BatcherAdmin`") == []
    assert name_problems("`pools.stratgy`")
    assert name_problems("`models.<name>.batching.max_batchsize`")
    assert name_problems("FLOTILLA_TRITON__REPLICA=3")
    assert name_problems("`flotilla.config.NoSuchSettings`")
    assert name_problems("`flotilla.no_such_module`")
    assert path_problems("`services/no_such_role/`")


class _PartlyDocumented(BaseModel):
    documented: int = 1
    """Has a docstring."""
    bare: int = 2


def test_a_setting_without_a_docstring_stops_the_generator() -> None:
    with pytest.raises(ValueError, match=r"bare \(section\.bare\) has no docstring"):
        docs_generator.table(_PartlyDocumented, "section", {})


def test_the_bench_writes_its_tables_into_the_benchmarks_page() -> None:
    """``make bench`` rewrites the blocks between its markers in one page: docs/benchmarks.md, which holds each
    marker once (a marker written in prose elsewhere would be where the bench cuts)."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "flotilla" / "bench").glob("*.py")))
    assert set(re.findall(r'Path\("([^"]+\.md)"\)', source)) == {"docs/benchmarks.md"}
    markers = set(re.findall(r"<!-- [\w-]+:(?:start|end) -->", source))
    assert markers, "the bench names no markers"
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        expected = 1 if page == REPO / "docs" / "benchmarks.md" else 0
        assert {m: text.count(m) for m in markers} == dict.fromkeys(markers, expected), rel(page)
