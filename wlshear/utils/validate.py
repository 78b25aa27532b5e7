"""Config validation at start-up: every checked key has a type and an allowed range.

This module is the vocabulary (:class:`Rule` and its shorthands ``Int``, ``Float``, ``File``, ...)
and the checks; the tables that map a full config key (``data.noise_scale``) to a rule live with
their configs: ``wlshear.data.rules.DATA_RULES`` (the ``data`` group, also checked by
:class:`~wlshear.data.ShearDataModule` on its own arguments) and ``wlshear.tasks.rules`` (one table
per entry point: train, evaluate, infer_clash and the command-line tasks). Every entry point calls
:func:`validate_config` before anything is built or rendered, so a bad value gives one
``ConfigError`` (a ``ValueError``) that lists every offending key, its value and what is allowed::

    invalid config value(s):
      data.noise_scale = -1.0: must be a number in [0, 100] (x the CLASH noise kernel; 0 = noiseless)

Keys absent from a config are not checked (groups differ between model and source options);
unset mandatory values (``???``) are reported by the entry points (:func:`missing_message`).
Relations between keys (e.g. the data stamp size must equal the network's) are passed as
``relations``: ``(keys, check)`` pairs whose check returns a message or None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "ConfigError",
    "MISSING",
    "Rule",
    "Int",
    "Float",
    "Bool",
    "Str",
    "Choice",
    "Choices",
    "Floats",
    "Pair",
    "File",
    "prefixed",
    "even_when",
    "parity",
    "missing_message",
    "problems",
    "validate_config",
    "validate_values",
]


class ConfigError(ValueError):
    """One or more config values have the wrong type or lie outside their allowed range."""


_MISSING = object()
#: what a relation's getter returns for a key the config does not have
MISSING = _MISSING


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


@dataclass(frozen=True)
class Rule:
    """Type and range of one config value.

    kind: ``int``, ``float`` (any real number), ``bool``, ``str``, ``choice`` (one of ``choices``),
        ``choices`` (a list of values each one of ``choices``), ``floats`` (a list of numbers, each
        in the range), ``pair`` (two numbers lo <= hi in the range), ``bools`` (a list of
        true/false), ``bins`` (an int >= lo, or an increasing list of numbers), ``file`` (a path
        whose suffix is one of ``choices``, if any; existing with ``must_exist``).
    lo, hi: inclusive bounds (None = unbounded); ``lo_open`` / ``hi_open`` make them exclusive.
    nullable: None (YAML ``null``) is allowed.
    min_len: minimum list length for list kinds; ``length``: exact length.
    increasing: list kinds must be strictly increasing.
    note: what the value means, appended to the message.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | Callable[[], Sequence] = ()
    nullable: bool = False
    min_len: int = 1
    increasing: bool = False
    note: str = ""
    specials: tuple = ()  # values accepted as they are (e.g. "auto"), besides the kind's
    length: int | None = None  # list kinds: exact length
    must_exist: bool = False  # file: the path must name an existing file

    # -- description --------------------------------------------------------------------------
    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f" {'>' if self.lo_open else '>='} {_num(lo)}"
        if lo is None:
            return f" {'<' if self.hi_open else '<='} {_num(hi)}"
        return f" in {'(' if self.lo_open else '['}{_num(lo)}, {_num(hi)}{')' if self.hi_open else ']'}"

    def _choices(self) -> tuple:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c)

    def describe(self) -> str:
        k = self.kind
        if k == "int":
            s = "an integer" + self._range()
        elif k == "float":
            s = "a number" + self._range()
        elif k == "bool":
            s = "true or false"
        elif k == "str":
            s = "a string"
        elif k == "choice":
            s = "one of " + ", ".join(repr(c) for c in self._choices())
        elif k == "choices":
            s = "a list of values, each one of " + ", ".join(repr(c) for c in self._choices())
        elif k == "floats":
            count = (f"{self.length} " if self.length else
                     f"{'>= ' + str(self.min_len) + ' ' if self.min_len > 1 else ''}")
            s = f"a list of {count}numbers" + (
                f", each{self._range()}" if self._range() else "") + (", increasing" if self.increasing else "")
        elif k == "file":
            c = self._choices()
            ending = "" if not c else " ending in " + (c[0] if len(c) == 1 else ", ".join(c[:-1]) + " or " + c[-1])
            s = ("the path of an existing file" if self.must_exist else "a file path") + ending
        elif k == "pair":
            s = "a list of two numbers [lo, hi] with lo <= hi" + (f", both{self._range()}" if self._range() else "")
        elif k == "bools":
            s = "a list of true/false values"
        elif k == "bins":
            s = f"an integer{self._range()} (number of bins) or an increasing list of bin edges"
        else:  # pragma: no cover - table error
            raise ValueError(f"unknown rule kind {k!r}")
        if self.nullable:
            s = "null or " + s
        if self.specials:
            s = s + " or " + " or ".join(repr(v) for v in self.specials)
        return s + (f" ({self.note})" if self.note else "")

    # -- checking -----------------------------------------------------------------------------
    def _in_range(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    @staticmethod
    def _is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def _number_ok(self, v: Any, integer: bool = False) -> bool:
        if not self._is_number(v):
            return False
        if integer and not float(v).is_integer():
            return False
        return self._in_range(float(v))

    def _list_ok(self, v: Any, check_item: Callable[[Any], bool]) -> bool:
        if not isinstance(v, (list, tuple)) or len(v) < self.min_len:
            return False
        if self.length is not None and len(v) != self.length:
            return False
        if not all(check_item(x) for x in v):
            return False
        if self.increasing and any(float(b) <= float(a) for a, b in zip(v, v[1:])):
            return False
        return True

    def ok(self, v: Any) -> bool:
        if self.specials and isinstance(v, str) and v in self.specials:
            return True
        return self._ok(v)

    def _ok(self, v: Any) -> bool:
        """True when ``v`` satisfies the rule."""
        if v is None:
            return self.nullable
        k = self.kind
        if k == "int":
            return self._number_ok(v, integer=True)
        if k == "float":
            return self._number_ok(v)
        if k == "bool":
            return isinstance(v, bool)
        if k == "str":
            return isinstance(v, str)
        if k == "choice":
            return isinstance(v, str) and v in self._choices()
        if k == "choices":
            return self._list_ok(v, lambda x: isinstance(x, str) and x in self._choices())
        if k == "file":
            if not isinstance(v, str) or not v:
                return False
            suffixes = self._choices()
            if suffixes and Path(v).suffix.lower() not in suffixes:
                return False
            return not self.must_exist or Path(v).expanduser().is_file()
        if k == "floats":
            return self._list_ok(v, self._number_ok)
        if k == "pair":
            return (isinstance(v, (list, tuple)) and len(v) == 2 and all(self._number_ok(x) for x in v)
                    and float(v[0]) <= float(v[1]))
        if k == "bools":
            return self._list_ok(v, lambda x: isinstance(x, bool))
        if k == "bins":
            if isinstance(v, (list, tuple)):
                return (len(v) >= 2 and all(self._is_number(x) and math.isfinite(float(x)) for x in v)
                        and all(float(b) > float(a) for a, b in zip(v, v[1:])))
            return self._number_ok(v, integer=True)
        raise ValueError(f"unknown rule kind {k!r}")  # pragma: no cover - table error


# ---------------------------------------------------------------------------------------------
# shorthand constructors for the tables

def Int(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802 - table vocabulary
    return Rule("int", lo, hi, note=note, **kw)


def Float(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802
    return Rule("float", lo, hi, note=note, **kw)


def Bool(note="", **kw) -> Rule:  # noqa: N802
    return Rule("bool", note=note, **kw)


def Choice(*choices, note="", **kw) -> Rule:  # noqa: N802
    return Rule("choice", choices=choices if not (len(choices) == 1 and callable(choices[0])) else choices[0],
                note=note, **kw)


def Floats(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802
    return Rule("floats", lo, hi, note=note, **kw)


def Pair(lo=None, hi=None, note="", **kw) -> Rule:  # noqa: N802
    return Rule("pair", lo, hi, note=note, **kw)


def Str(note="", **kw) -> Rule:  # noqa: N802
    return Rule("str", note=note, **kw)


def Choices(*choices, note="", **kw) -> Rule:  # noqa: N802
    return Rule("choices", choices=choices, note=note, **kw)


def File(*suffixes, must_exist: bool = False, note="", **kw) -> Rule:  # noqa: N802
    """A file path ending in one of ``suffixes`` (any when none are given)."""
    return Rule("file", choices=tuple(s.lower() for s in suffixes), must_exist=must_exist, note=note, **kw)


def prefixed(prefix: str, table: Mapping[str, Rule]) -> dict[str, Rule]:
    """``table`` with every key under ``prefix`` (``noise_scale`` -> ``data.noise_scale``)."""
    return {f"{prefix}.{k}": v for k, v in table.items()}


def even_when(n_key: str, flag_key: str, why: str = "renders 90-degree ring pairs") -> Callable[[Callable[[str], Any]], str | None]:
    """A relation: ``n_key`` must be even when ``flag_key`` is true."""
    def check(get: Callable[[str], Any]) -> str | None:
        n, flag = get(n_key), get(flag_key)
        if flag is True and isinstance(n, int) and n % 2:
            return f"{n_key} = {n} must be even: {flag_key} = true {why}"
        return None
    return check


def parity(key: str, odd: bool, why: str) -> Callable[[Callable[[str], Any]], str | None]:
    """A relation: the integer at ``key`` must be odd (``odd=True``) or even."""
    def check(get: Callable[[str], Any]) -> str | None:
        v = get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v % 2 != int(odd):
            return f"{key} = {v} must be {'odd' if odd else 'even'} ({why})"
        return None
    return check


def missing_message(cfg: DictConfig, example: str) -> str | None:
    """A message naming the mandatory values (``???``) ``cfg`` leaves unset, or None."""
    def walk(node, prefix: str):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            key = f"{prefix}{k}" if isinstance(node, dict) else f"{prefix[:-1]}[{k}]"
            if v == "???":
                yield key
            else:
                yield from walk(v, key + ".")

    # unresolved: other values may interpolate run-time values (hydra:...) that a composed config lacks
    missing = sorted(walk(OmegaConf.to_container(cfg, resolve=False), ""))
    if not missing:
        return None
    return (f"these config values are required but unset: {', '.join(missing)}. Pass them on the command line, "
            f"e.g. `{example}`")


# ---------------------------------------------------------------------------------------------

def _plain(v: Any) -> Any:
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    return v


def _getter(cfg: Any) -> Callable[[str], Any]:
    if isinstance(cfg, DictConfig):
        def get(key: str) -> Any:
            try:
                v = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
            except Exception:  # unresolvable interpolation: reported by whoever resolves it
                return _MISSING
            return _plain(v)
        return get

    def get_plain(key: str) -> Any:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return _plain(node)
    return get_plain


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v).replace("True", "true").replace("False", "false")


def problems(cfg: Any, rules: Mapping[str, Rule], relations=()) -> list[str]:
    """Messages for every value of ``cfg`` (DictConfig or nested dict) that breaks its rule."""
    get = _getter(cfg)
    out, bad = [], set()
    for key, rule in rules.items():
        v = get(key)
        if v is _MISSING or v == "???":
            continue
        if not rule.ok(v):
            bad.add(key)
            kind = " (a string)" if isinstance(v, str) and rule.kind not in ("str", "choice", "file") else ""
            out.append(f"{key} = {_fmt(v)}{kind}: must be {rule.describe()}")
    for keys, rel in relations or ():
        if bad.intersection(keys):
            continue
        msg = rel(get)
        if msg:
            out.append(msg)
    return out


def validate_config(cfg: Any, rules: Mapping[str, Rule], what: str = "config", relations=()) -> None:
    """Raise :class:`ConfigError` listing every value of ``cfg`` that breaks ``rules``."""
    msgs = problems(cfg, rules, relations)
    if msgs:
        raise ConfigError(f"invalid {what} value(s) (fix them on the command line or in conf/):\n  "
                          + "\n  ".join(msgs))


def validate_values(values: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "",
                    what: str = "argument") -> None:
    """Check plain keyword arguments (``values``) against relative ``rules``; messages name
    ``prefix + key`` (e.g. ``data.noise_scale``) so they match the config key."""
    flat: dict[str, Any] = {}
    for key, rule in rules.items():
        node: Any = values
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = _MISSING
                break
            node = node[part]
        if node is not _MISSING:
            flat[prefix + key] = node
    msgs = [f"{k} = {_fmt(v)}: must be {rules[k[len(prefix):]].describe()}"
            for k, v in flat.items() if not rules[k[len(prefix):]].ok(_plain(v))]
    if msgs:
        raise ConfigError(f"invalid {what}(s):\n  " + "\n  ".join(msgs))
