"""params files as text: YAML of plain values only, read so that no file can hang the reader or
make it allocate (no anchors or aliases, bounded size and depth), every problem a ParamsError
naming the line. ddpm.params validates what this returns."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ddpm.errors import ParamsError

MAX_BYTES, MAX_DEPTH = 1 << 20, 16


class _Loader(yaml.SafeLoader):
    """YAML for params.yaml: plain values only (no anchors or aliases, which can expand a few
    lines into billions of values), string keys, no key twice, nesting at most MAX_DEPTH deep;
    1e-4 is a number (YAML 1.2), not the string that YAML 1.1 makes of it."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _yaml_error(event, "anchors and aliases (& and *) are not accepted: write "
                                     "each value out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _yaml_error(event, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise _yaml_error(key_node, f"the key {key_node.value or 'null'} is not a string")
            if key in lines:
                raise _yaml_error(key_node, f"the key {key!r} appears twice (also on line "
                                            f"{lines[key]}); the second would silently win")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _yaml_error(where: Any, message: str) -> ParamsError:
    return ParamsError(f"line {where.start_mark.line + 1}: {message}")


def read_yaml(path: Path) -> Any:
    """The parsed content of a params file; any problem is a ParamsError naming the line."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ParamsError(f"{size:,} bytes; a params file is a few KB (at most {MAX_BYTES:,})")
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as e:
        raise ParamsError(f"not a text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"not valid YAML ({' '.join(str(e).split())})") from None
