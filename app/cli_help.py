"""What `crl SUBCOMMAND --help` says about each config field, and how unknown flags are refused.

The descriptions are the comments written beside (or just above) each field in crl/config.py:
one source for the code reader and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import sys
from typing import Dict

from crl import config as C

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")


def _class_descriptions(cls) -> Dict[str, str]:
    """{field: description} of one dataclass, from its source: the trailing comment, else the
    comment lines right above the field."""
    out: Dict[str, str] = {}
    above = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@", '"""')):
            text = (m.group(2) or "").strip() or " ".join(above)
            if text:
                out[m.group(1)] = text
        above = []
    return out


def field_descriptions(cls=C.Config, prefix: str = "") -> Dict[str, str]:
    """{dotted field name: description} of every leaf field of the config tree."""
    own = _class_descriptions(cls)
    out: Dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default) or dataclasses.is_dataclass(f.type):
            sub = type(f.default) if dataclasses.is_dataclass(f.default) else f.type
            out.update(field_descriptions(sub, f"{prefix}{f.name}."))
        elif f.name in own:
            out[f"{prefix}{f.name}"] = own[f.name]
    return out


class Parser(argparse.ArgumentParser):
    """argparse with abbreviations off (`--env.nam` is not `--env.name`) and a close-match
    suggestion for an unknown option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        unknown = re.findall(r"(--?[\w.\-]+)", message.split(":", 1)[-1]) \
            if "unrecognized arguments" in message else []
        options = [o for a in self._actions for o in a.option_strings]
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u.split("=")[0], options, n=1, cutoff=0.6)
            if close:
                hints.append(f"{u}: did you mean {close[0]}?")
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        if hints:
            text += "\n" + "\n".join(hints)
        self.exit(2, text + "\n")
