"""The ledger's Lua scripts, and how each is assembled before Redis loads it.

A script is its own ``<name>.lua`` behind a prelude: the key helpers rendered from
:mod:`gridqueue.keys` and the shared functions of ``_common.lua``. Redis compiles a script
once, but runs its whole chunk on every call, so every ``local function`` and table of the
prelude is built again on each EVALSHA, used or not; with every helper in it that was
about half the price of a heartbeat. So each script gets only the part of the prelude it
uses: the prelude is cut into its top-level statements, and a statement goes in when a
name it defines is named by the script, or by a statement already in, and so on.

The walk reads names, not meaning, and errs on the side of taking too much: any name in
the code (field names included) counts as a use, and a top-level statement that defines
nothing (there is none today) is always taken. Only strings and comments are skipped:
they cannot refer to a local. Statements keep their order, so each still sees what it
used before. Loading is unchanged: the text is still registered as one script, with its
own SHA and the same NOSCRIPT handling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from gridqueue.keys import lua_prelude

__all__ = ["read_lua", "script_source"]

# Comments and strings (short and long), whose words are not names, then names.
_LEXEME = re.compile(
    r"--\[(?P<c>=*)\[.*?\](?P=c)\]"
    r"|--[^\n]*"
    r"|\[(?P<s>=*)\[.*?\](?P=s)\]"
    r"|'(?:\\.|[^'\\\n])*'"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|(?P<name>[A-Za-z_]\w*)",
    re.DOTALL,
)
_LOCAL_FUNCTION = re.compile(r"local\s+function\s+([A-Za-z_]\w*)")
_LOCAL_NAMES = re.compile(r"local\s+([A-Za-z_][\w\s,]*?)\s*(?:=|$)", re.MULTILINE)


def read_lua(name: str) -> str:
    return (resources.files(__name__) / f"{name}.lua").read_text(encoding="utf-8")


def names_used(code: str) -> set[str]:
    """The names in Lua ``code``, outside its strings and comments."""
    return {m.group("name") for m in _LEXEME.finditer(code) if m.group("name")}


@dataclass(frozen=True)
class _Statement:
    text: str
    defines: frozenset[str]  # empty: always taken
    uses: frozenset[str]


def _defined(first_line: str) -> frozenset[str]:
    if match := _LOCAL_FUNCTION.match(first_line):
        return frozenset({match.group(1)})
    if match := _LOCAL_NAMES.match(first_line):
        return frozenset(name.strip() for name in match.group(1).split(","))
    return frozenset()


def _statements(prelude: str) -> list[_Statement]:
    """Cut the prelude into its top-level statements: one begins at each line that starts
    in column 0 (a ``local``, or any other statement), with the comment lines right above
    it; indented lines and closing ``end``/``}``/``)`` lines continue the one before."""
    chunks: list[list[str]] = [[]]
    comments: list[str] = []
    for line in prelude.splitlines(keepends=True):
        if line.startswith("--"):
            comments.append(line)
            continue
        starts = line[:1] not in ("", " ", "\t", "\n", "\r") and not line.startswith(
            ("end", "else", "until", "}", ")")
        )
        if starts:
            chunks.append([])
        chunks[-1].extend(comments)
        chunks[-1].append(line)
        comments = []
    chunks[-1].extend(comments)
    statements = []
    for chunk in chunks:
        code = "".join(chunk)
        first = next((line for line in chunk if not line.startswith("--")), "")
        statements.append(_Statement(code, _defined(first), frozenset(names_used(code))))
    return statements


@cache
def _prelude_statements() -> tuple[_Statement, ...]:
    return tuple(_statements(lua_prelude() + read_lua("_common")))


def prelude_for(body: str) -> str:
    """The part of the prelude that ``body`` needs, in the prelude's order."""
    statements = _prelude_statements()
    taken = [not statement.defines for statement in statements]
    wanted = set(names_used(body))
    for statement, take in zip(statements, taken, strict=True):
        if take:
            wanted |= statement.uses
    changed = True
    while changed:  # a fixed point: a statement taken may name others
        changed = False
        for i, statement in enumerate(statements):
            if not taken[i] and statement.defines & wanted:
                taken[i] = changed = True
                wanted |= statement.uses
    return "".join(s.text for s, take in zip(statements, taken, strict=True) if take)


@cache
def script_source(name: str) -> str:
    """A script as the ledger loads it: the prelude it needs, then its own body."""
    body = read_lua(name)
    return prelude_for(body) + body
