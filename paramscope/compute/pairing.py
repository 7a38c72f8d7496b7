"""Pairing two checkpoints saved under different naming schemes: which array of A is which of B.

A conversion (Orbax to safetensors, linen to NNX, scanned to per-layer) renames arrays and may
transpose some. :class:`PairingRules` says how to go from A's paths to B's:

- ``rename``: ``(regex, replacement)`` rules applied in order to each of A's paths with
  ``re.sub`` (every match; Python's replacement syntax, ``\\1``, ``\\g<name>``). A's arrays are
  then paired with B's by the renamed path.
- ``transpose``: regexes; an array of A whose *renamed* path matches one (``re.search``) is
  compared transposed (``a.T``, every axis reversed) with B's array.
- ``unstack``: one array per layer of scanned (stacked) arrays, before renaming.

On the command line a rule is ``REGEX=REPLACEMENT``, split at the first ``=`` that is not part
of the regex: a literal ``=`` in the regex is written ``\\=``, and the ``=`` of ``(?=``,
``(?<=`` and ``(?P=name)`` belongs to the regex. The replacement is everything after the
split. A map file (JSON, or TOML for a name ending ``.toml``) holds the same rules::

    rename = [['^params\\.Dense_(\\d+)\\.kernel$', 'model.layers.\\1.mlp.up_proj.weight']]
    transpose = ['mlp\\.up_proj\\.weight$']
    unstack = true
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from paramscope.errors import UsageError

MAP_KEYS = ("rename", "transpose", "unstack")
MAP_HINT = "a map file holds rename = [[REGEX, REPLACEMENT], ...], transpose = [REGEX, ...], unstack = true"


@dataclass(frozen=True)
class RenameRule:
    """One substitution: every match of ``pattern`` in a path is replaced by ``replacement``."""

    pattern: re.Pattern
    replacement: str

    def apply(self, path: str) -> str:
        return self.pattern.sub(self.replacement, path)


@dataclass(frozen=True)
class PairingRules:
    """How A's paths become B's names, and which of A's arrays are compared transposed."""

    rename: tuple[RenameRule, ...] = ()
    transpose: tuple[re.Pattern, ...] = ()
    unstack: bool = False

    @property
    def active(self) -> bool:
        return bool(self.rename or self.transpose)

    def then(self, other: PairingRules) -> PairingRules:
        """These rules, then ``other``'s (its renames apply to what these produce)."""
        return PairingRules(
            self.rename + other.rename, self.transpose + other.transpose, self.unstack or other.unstack
        )

    def renamed(self, path: str) -> str:
        """``path`` after every rename rule, in order.

        >>> rules = PairingRules((rename_rule(r"^params\\.", "model."), rename_rule("kernel$", "weight")))
        >>> rules.renamed("params.Dense_0.kernel")
        'model.Dense_0.weight'
        """
        for rule in self.rename:
            path = rule.apply(path)
        return path

    def transposed(self, renamed: str) -> bool:
        """Whether the array of A renamed to ``renamed`` is compared transposed."""
        return any(pattern.search(renamed) for pattern in self.transpose)

    def as_json(self) -> dict:
        return {
            "rename": [[r.pattern.pattern, r.replacement] for r in self.rename],
            "transpose": [p.pattern for p in self.transpose],
        }


NO_RULES = PairingRules()


def _compile(pattern: str, source: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UsageError(f"invalid regex {pattern!r} in {source}: {err}", hint="use a Python regex") from None


def rename_rule(pattern: str, replacement: str, source: str = "rename rule") -> RenameRule:
    """A rename rule, its regex and its replacement checked (group references included).

    >>> rename_rule(r"Dense_(\\d+)", r"layers.\\1").apply("params.Dense_3.kernel")
    'params.layers.3.kernel'
    """
    regex = _compile(pattern, source)
    # A match with this regex's groups (all unmatched) checks the replacement's references.
    try:
        probe = re.compile(pattern + "|").match("")
    except re.error:  # what re.sub would say is still caught where the rules are applied
        probe = None
    if probe is not None:
        try:
            probe.expand(replacement)
        except (re.error, IndexError) as err:
            raise UsageError(
                f"invalid replacement {replacement!r} in {source}: {err}",
                hint=r"refer to the regex's groups as \1 or \g<name>; write a backslash as \\",
            ) from None
    return RenameRule(regex, replacement)


_REGEX_EQUALS = ("(?", "(?<", "(?!", "(?<!", "(?P")  # an '=' right after these is the regex's own


def split_rule(text: str) -> tuple[str, str] | None:
    """``REGEX=REPLACEMENT`` split at the first ``=`` that is not part of the regex; None
    without one.

    >>> split_rule(r"a\\=b=c=d"), split_rule(r"x(?=y)=z"), split_rule("abc")
    (('a\\\\=b', 'c=d'), ('x(?=y)', 'z'), None)
    """
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "=" and not text[:i].endswith(_REGEX_EQUALS):
            return text[:i], text[i + 1 :]
        i += 1
    return None


def parse_rename(text: str, source: str = "--rename") -> RenameRule:
    """A ``REGEX=REPLACEMENT`` rule as the command line gives it."""
    parts = split_rule(text)
    if parts is None:
        raise UsageError(
            f"{source} {text!r} has no '=' between REGEX and REPLACEMENT",
            hint=r"write REGEX=REPLACEMENT, e.g. 'Dense_(\d+)=layers.\1' (a literal '=' in the regex: \=)",
        )
    return rename_rule(*parts, source=f"{source} {text!r}")


def command_line_rules(
    rename: Sequence[str] | None, transpose: Sequence[str] | None, unstack: bool = False
) -> PairingRules:
    """The rules of ``--rename REGEX=REPLACEMENT`` and ``--transpose REGEX`` options."""
    return PairingRules(
        tuple(parse_rename(text) for text in rename or ()),
        tuple(_compile(text, "--transpose") for text in transpose or ()),
        unstack,
    )


def load_map(path: str) -> PairingRules:
    """The rules of a map file: TOML when its name ends in ``.toml``, else JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"map file {path} not found", hint="give the path of a JSON or TOML file") from None
    except OSError as err:
        raise UsageError(f"cannot read map file {path}: {err.strerror}", hint="check the path") from None
    if path.lower().endswith(".toml"):
        toml = _toml_reader()
        try:
            document = toml.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, toml.TOMLDecodeError) as err:
            raise UsageError(f"map file {path} is not valid TOML: {err}", hint=MAP_HINT) from None
    else:
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(
                f"map file {path} is not valid JSON: {err}",
                hint=MAP_HINT + " (a name ending .toml is read as TOML)",
            ) from None
    return rules_from_document(document, os.path.basename(path))


def _toml_reader():
    """``tomllib`` (Python 3.11+), or its backport ``tomli`` on Python 3.10."""
    try:
        import tomllib

        return tomllib
    except ImportError:
        try:
            import tomli

            return tomli
        except ImportError:
            raise UsageError(
                "reading a TOML map file needs Python 3.11 or the tomli package",
                hint="install tomli, or write the map file as JSON",
            ) from None


def rules_from_document(document, name: str) -> PairingRules:
    """The rules of a parsed map file, every field checked.

    >>> rules_from_document({"rename": [["a", "b"]], "transpose": ["b$"]}, "map.json").renamed("xa")
    'xb'
    """
    if not isinstance(document, dict):
        raise UsageError(f"map file {name} holds a {type(document).__name__}, not a table", hint=MAP_HINT)
    unknown = [key for key in document if key not in MAP_KEYS]
    if unknown:
        raise UsageError(f"map file {name} has an unknown key {unknown[0]!r}", hint=MAP_HINT)
    renames = document.get("rename", [])
    if not isinstance(renames, list):
        raise UsageError(f"map file {name}: rename must be a list of [REGEX, REPLACEMENT]", hint=MAP_HINT)
    rules = []
    for i, entry in enumerate(renames):
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(s, str) for s in entry)):
            raise UsageError(
                f"map file {name}: rename[{i}] is {json.dumps(entry)}, not [REGEX, REPLACEMENT]",
                hint=MAP_HINT,
            )
        rules.append(rename_rule(entry[0], entry[1], source=f"map file {name} rename[{i}]"))
    transposes = document.get("transpose", [])
    if not isinstance(transposes, list) or not all(isinstance(s, str) for s in transposes):
        raise UsageError(f"map file {name}: transpose must be a list of regexes (strings)", hint=MAP_HINT)
    patterns = [_compile(p, f"map file {name} transpose[{i}]") for i, p in enumerate(transposes)]
    unstack = document.get("unstack", False)
    if not isinstance(unstack, bool):
        raise UsageError(f"map file {name}: unstack must be true or false", hint=MAP_HINT)
    return PairingRules(tuple(rules), tuple(patterns), unstack)


def renamed_paths(paths: Iterable[str], rules: PairingRules) -> dict[str, str]:
    """Each of A's paths -> the name it is paired under; two paths given one name is an error.

    >>> renamed_paths(["a.kernel", "b.kernel"], PairingRules((rename_rule("^a", "x"),)))
    {'a.kernel': 'x.kernel', 'b.kernel': 'b.kernel'}
    """
    names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for path in paths:
        try:
            name = rules.renamed(path)
        except re.error as err:  # a replacement the up-front check could not probe
            raise UsageError(f"a rename rule fails on {path}: {err}", hint="check its replacement") from None
        if not name:
            raise UsageError(
                f"the rename rules turn {path} into an empty path", hint="check the replacements"
            )
        if name in owners:
            raise UsageError(
                f"the rename rules give {owners[name]} and {path} the same name {name}",
                hint="each array of A must keep a name of its own; make the rules tell them apart",
            )
        owners[name] = path
        names[path] = name
    return names


def unused_rules(paths: Sequence[str], rules: PairingRules) -> list[str]:
    """What the rules do nothing to, as sentences: a rename that changes no path, a transpose
    pattern that matches no renamed path."""
    notes = []
    current = list(paths)
    for rule in rules.rename:
        changed = [rule.apply(p) for p in current]
        if changed == current:
            notes.append(f"rename rule {rule.pattern.pattern!r} changes no path")
        current = changed
    for pattern in rules.transpose:
        if not any(pattern.search(p) for p in current):
            notes.append(f"transpose pattern {pattern.pattern!r} matches no renamed path")
    return notes
