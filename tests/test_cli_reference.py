"""Issue 20 item 4: docs/CLI.md is the reference and stays true.

For every program it documents, the program's own argparse parser is compared with the rows of
its section: every flag has a row, every default and every choice is written in that row, no row
names a flag the program does not have. A failure says which program, which flag and what is
missing, so whoever adds a flag knows the row to write.
"""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "CLI.md"

# program -> the module whose main() (or build_parser()) makes its parser
PROGRAMS = {
    "python -m host": "host.__main__",
    "python -m guest": "guest.__main__",
    "python -m tools.demo": "tools.demo",
    "python -m tools.wait_socket": "tools.wait_socket",
    "python -m tools.monitor": "tools.monitor",
    "python -m tools.stress": "tools.stress.__main__",
    "python -m tools.fuzz": "tools.fuzz.__main__",
    "python -m tools.bench": "tools.bench.__main__",
    "python -m tools.bench_ring": "tools.bench_ring",
    "python -m tools.bench_net": "tools.bench_net",
    "python -m tools.bench_vhost_user": "tools.bench_vhost_user",
    "python -m tools.bench_vhost_user_net": "tools.bench_vhost_user_net",
    "python -m tools.linux_guest": "tools.linux_guest",
    "python -m tools.monitor.overhead": "tools.monitor.overhead",
    "python -m tools.stress.hostile": "tools.stress.hostile",
    "python -m tools.mutants": "tools.mutants.__main__",
    "python -m tools.migrate": "tools.migrate.__main__",
}
COMMON = "Common to"            # the section of flags host and guest share


class _Captured(Exception):
    pass


def get_parser(module: str) -> argparse.ArgumentParser:
    """The module's parser: build_parser() when it has one, else the parser its main() builds
    (caught at parse_args, before anything runs)."""
    m = importlib.import_module(module)
    if hasattr(m, "build_parser"):
        return m.build_parser()
    orig = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        raise _Captured(self)
    argparse.ArgumentParser.parse_args = grab
    try:
        m.main([])
    except _Captured as c:
        return c.args[0]
    finally:
        argparse.ArgumentParser.parse_args = orig
    raise AssertionError(f"{module}.main() never called parse_args")


def sections(text: str) -> dict[str, str]:
    """Heading -> body, for '## ' and '### ' headings. A heading's key is its first `code`."""
    out: dict[str, str] = {}
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.M)
    for head, body in zip(parts[1::2], parts[2::2]):
        m = re.search(r"`([^`]+)`", head)
        key = head.lstrip("# ").strip() if head.lstrip("# ").startswith(COMMON) or not m else m.group(1)
        key = re.sub(r"\s+[A-Z][A-Z_\[\] ]*$", "", key)     # "python -m tools.wait_socket PATH"
        out[key] = head + "\n" + body
    return out


def rows(body: str) -> dict[str, str]:
    """Flag -> its table row ('| `--flag ARG` | meaning |'), for every flag the first cell names."""
    out: dict[str, str] = {}
    for line in body.splitlines():
        if not line.startswith("| `-"):
            continue
        first = line.split(" | ")[0]
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", first):
            out[flag] = line
    return out


def fmt_default(v) -> str | None:
    """How a default is written in a row; None for defaults a row need not state."""
    if v is None or v is False or v == [] or v == argparse.SUPPRESS or isinstance(v, Path):
        return None
    if isinstance(v, bool):
        return None
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if v == "":
        return "''"
    return str(v)


def flat(row: str) -> str:
    return row.replace("`", "").replace("\\|", "|")


@pytest.fixture(scope="module")
def doc() -> dict[str, str]:
    return sections(CLI_MD.read_text())


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch):
    monkeypatch.delenv("VIRTIO_EMU_LOG_LEVEL", raising=False)   # the documented default, not the env's


def _section_rows(doc: dict[str, str], prog: str) -> dict[str, str]:
    assert prog in doc, f"docs/CLI.md has no section `{prog}` (a heading naming it in backticks)"
    got = rows(doc[prog])
    if prog in ("python -m host", "python -m guest"):
        common = next((b for k, b in doc.items() if k.startswith(COMMON)), "")
        got = {**rows(common), **got}
    return got


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_every_flag_default_and_choice_is_documented(doc, prog):
    parser = get_parser(PROGRAMS[prog])
    documented = _section_rows(doc, prog)
    problems = []
    flags = set()
    for a in parser._actions:
        if not a.option_strings:                       # a positional: named in the section
            name = (a.metavar or a.dest).upper()
            if name not in doc[prog]:
                problems.append(f"positional {name} is not mentioned in its section")
            continue
        long = [o for o in a.option_strings if o.startswith("--")]
        if not long or long[0] == "--help":
            continue
        if long[0] == "--version":         # every program's, described once at the top of the page
            assert "`--version`" in CLI_MD.read_text().split("\n## ")[0]
            continue
        flag = long[0]
        flags.add(flag)
        row = documented.get(flag)
        if row is None:
            problems.append(f"{flag} has no row (add '| `{flag} ...` | meaning, Default X |' to its section)")
            continue
        text = flat(row)
        want = fmt_default(a.default)
        if want is not None and not re.search(rf"(?i)default:?\s+{re.escape(want)}(?!\w|\.\d)", text):
            problems.append(f"{flag}: its row does not say 'Default {want}' (the parser's default is {a.default!r})")
        for c in a.choices or ():
            if not re.search(rf"(?<![\w-]){re.escape(str(c))}(?![\w-])", text):
                problems.append(f"{flag}: its row does not name the choice {c!r}")
    for flag in documented:
        if flag not in flags and flag not in ("--help", "--version"):
            problems.append(f"the row for {flag} names a flag {prog} does not have")
    assert not problems, f"docs/CLI.md, section `{prog}`:\n  " + "\n  ".join(problems)


def test_every_entry_point_has_a_section(doc):
    from tests.test_cli_errors import ENTRY_POINTS
    missing = [m for m in ENTRY_POINTS if f"python -m {m}" not in doc]
    assert not missing, f"docs/CLI.md has no section for: {missing}"
    assert set(f"python -m {m}" for m in ENTRY_POINTS) == set(PROGRAMS), \
        "tests/test_cli_reference.py PROGRAMS and tests/test_cli_errors.py ENTRY_POINTS differ"


def test_facts_a_newcomer_relies_on(doc):
    text = CLI_MD.read_text()
    for stale in ("tools.bench_vsock", "another branch"):
        assert stale not in text, f"docs/CLI.md still says {stale!r}"
    from shared.vsock.services import HANDLERS
    service = flat(rows(next(b for k, b in doc.items() if k.startswith(COMMON)))["--service"])
    missing = [k for k in HANDLERS if k not in service]
    assert not missing, f"the --service row does not name the service(s) {missing}"
    cid = flat(rows(doc["python -m guest"])["--cid"])
    assert "Required" not in cid and "--net" in cid, cid          # optional with --net
    for flag in ("--net", "--ip", "--mac", "--net-run", "--rx-buf-size"):
        assert flag in rows(doc["python -m guest"]), flag
    for flag in ("--service", "--run", "--poll-us", "--buf-size"):
        assert flag in _section_rows(doc, "python -m host"), flag


def test_the_checker_catches_drift():
    """The comparison can fail: a parser with an undocumented flag, a wrong default, a missing
    choice and a stale row is reported flag by flag."""
    p = argparse.ArgumentParser()
    p.add_argument("--kept", type=int, default=3)
    p.add_argument("--mode", choices=("a", "b"), default="a")
    p.add_argument("--new", default="x")
    body = ("| `--kept N` | Default 4. |\n| `--mode a` | Default a. |\n| `--gone` | old |\n")
    documented = rows(body)
    assert set(documented) == {"--kept", "--mode", "--gone"}
    assert not re.search(rf"(?i)default:?\s+{re.escape(fmt_default(3))}(?!\w|\.\d)", flat(documented["--kept"]))
    assert not re.search(r"(?<![\w-])b(?![\w-])", flat(documented["--mode"]))
    assert "--new" not in documented
