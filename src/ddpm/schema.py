"""Declared schemas: frozen dataclasses whose annotations say what each field accepts, one function
that validates a parsed mapping against them, and the JSON schema they imply.

    lr: Float("Adam's learning rate", gt=0, le=1)    # Annotated[float, Range(gt=0, le=1), Doc(...)]

A value that does not fit is a ParamsError of one line naming the key and what it accepts, in
words made from the same annotations (`accepted`). Integers are not floats' booleans: a bool is
never a number, an int is a float where a float is meant, and a float is finite.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from ddpm.errors import ParamsError


@dataclasses.dataclass(frozen=True)
class Range:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def words(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else ""
        high = (f"{self.le}]" if self.le is not None
                else f"{self.lt})" if self.lt is not None else "")
        if low and high:
            return f" in {low}, {high}"
        return f" {'>=' if low[:1] == '['  else '>'} {low[1:]}" if low else ""


@dataclasses.dataclass(frozen=True)
class Length:
    min: int = 0
    max: int | None = None


@dataclasses.dataclass(frozen=True)
class Pattern:
    regex: str


@dataclasses.dataclass(frozen=True)
class Doc:
    """What a key means: docs/params.md and the JSON schema's descriptions."""
    text: str


@dataclasses.dataclass(frozen=True)
class Resumable:
    """A key that does not change the optimisation (length, hardware, cadence of side outputs):
    a checkpoint resumes across a change of it, so it is not part of a run's identity."""


@dataclasses.dataclass(frozen=True)
class SpeedOnly:
    """A key that sets only how fast a result is computed (a batch size whose images or features
    do not depend on it, up to float rounding): the train stage, whose run it would restart for
    nothing, does not list it in dvc.yaml, though its side outputs (FIDs during training) use it."""


@dataclasses.dataclass(frozen=True)
class Accepts:
    """What a field accepts, in words, where its type does not say it well."""
    text: str


def Int(ge: int, le: int, doc: str, *more: Any) -> Any:
    return Annotated[(int, Range(ge=ge, le=le), Doc(doc), *more)]


def Float(doc: str, **bounds: float) -> Any:
    return Annotated[float, Range(**bounds), Doc(doc)]


def unwrap(annotation: Any) -> tuple[Any, tuple]:
    """Annotated[T, m1, m2] -> (T, (m1, m2)); anything else -> (it, ())."""
    if get_origin(annotation) is Annotated:
        inner, *metadata = get_args(annotation)
        base, more = unwrap(inner)
        return base, (*more, *metadata)
    return annotation, ()


def find(metadata: tuple, kind: type) -> Any:
    return next((m for m in metadata if isinstance(m, kind)), None)


def short(value: Any, limit: int = 40) -> str:
    """repr(value), cut to a prefix: a message stays one short line whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def accepted(annotation: Any) -> str:
    """What a field accepts, in words, from its type and metadata (the end of its errors)."""
    base, meta = unwrap(annotation)
    if words := find(meta, Accepts):
        return words.text
    origin, args = get_origin(base), get_args(base)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union:
        return " or ".join(accepted(a) for a in args)
    if origin is tuple:
        size = find(meta, Length)
        count = f" of {size.min} to {size.max} items" if size else ""
        return f"a list{count}, each {accepted(args[0])}"
    if dataclasses.is_dataclass(base):
        return "a mapping of keys to values"
    if base is str:
        return "a non-empty string" if find(meta, Length) else "a string"
    bounds = find(meta, Range)
    kind = {bool: "true or false", int: "an integer", float: "a finite number"}[base]
    return kind + (bounds.words() if bounds else "")


def parse(cls: type, raw: Any, prefix: str = "", removed: dict[str, str] | None = None) -> Any:
    """`raw` (parsed YAML) as an instance of the dataclass `cls`, or the ParamsError of its first
    problem: an unknown, removed or missing key, then the first value that does not fit."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params.yaml'} = {short(raw)}: expected a "
                          "mapping of keys to values")
    hints = get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if f"{prefix}{key}" in (removed or {}):
            raise ParamsError(f"{prefix}{key}: {removed[prefix + key]}")
        if key not in names:
            raise ParamsError(f"{prefix}{key}: unknown key (accepted here: {', '.join(names)})")
    for key in names:
        if key not in raw:
            raise ParamsError(f"{prefix}{key}: missing (params.yaml must set every key)")
    return cls(**{key: value(hints[key], raw[key], prefix + key, removed) for key in names})


def value(annotation: Any, raw: Any, key: str, removed: dict[str, str] | None = None) -> Any:
    """One field's value: lists become tuples, ints become floats where floats are meant."""
    base, meta = unwrap(annotation)
    if dataclasses.is_dataclass(base):
        return parse(base, raw, key + ".", removed)
    error = ParamsError(f"{key} = {short(raw)}: expected {accepted(annotation)}")
    origin, args = get_origin(base), get_args(base)
    if origin is Union:
        for member in args:
            try:
                return value(member, raw, key)
            except ParamsError:
                pass
        raise error
    if origin is Literal:
        if any(raw == a and type(raw) is type(a) for a in args):
            return raw
        raise error
    if origin is tuple:
        size = find(meta, Length) or Length()
        if not isinstance(raw, (list, tuple)) or not size.min <= len(raw) <= (size.max or len(raw)):
            raise error
        return tuple(value(args[0], item, f"{key}[{i}]") for i, item in enumerate(raw))
    if base is float and isinstance(raw, int) and not isinstance(raw, bool):
        try:
            raw = float(raw)
        except OverflowError:  # an integer beyond any float
            raise error from None
    if not isinstance(raw, base) or (isinstance(raw, bool) and base is not bool) or not fits(raw,
                                                                                          meta):
        raise error
    return raw


def fits(raw: Any, meta: tuple) -> bool:
    """A value of the right type within the field's bounds, length and pattern; floats finite."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return False
    return all((not isinstance(m, Range) or m.holds(raw))
               and (not isinstance(m, Length) or len(raw) >= m.min)
               and (not isinstance(m, Pattern) or re.fullmatch(m.regex, raw) is not None)
               for m in meta)


def json_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema (draft 2020-12 keywords) of a field or a dataclass, for editors."""
    base, meta = unwrap(annotation)
    schema: dict[str, Any] = {}
    if doc := find(meta, Doc):
        schema["description"] = doc.text
    origin, args = get_origin(base), get_args(base)
    if dataclasses.is_dataclass(base):
        hints = get_type_hints(base, include_extras=True)
        names = [f.name for f in dataclasses.fields(base)]
        schema.update(type="object", additionalProperties=False, required=names,
                      properties={name: json_schema(hints[name]) for name in names})
    elif origin is Union:
        schema["anyOf"] = [json_schema(a) for a in args]
    elif origin is Literal:
        schema["enum"] = list(args)
    elif origin is tuple:
        size = find(meta, Length) or Length()
        schema.update(type="array", items=json_schema(args[0]), minItems=size.min)
        schema.update({"maxItems": size.max} if size.max is not None else {})
    else:
        schema["type"] = {bool: "boolean", int: "integer", float: "number", str: "string"}[base]
        bounds, pattern, size = find(meta, Range), find(meta, Pattern), find(meta, Length)
        names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum",
                 "lt": "exclusiveMaximum"}
        schema.update({names[k]: v for k, v in dataclasses.asdict(bounds or Range()).items()
                       if v is not None})
        schema.update({"pattern": f"^(?:{pattern.regex})$"} if pattern else {})
        schema.update({"minLength": size.min} if size else {})
    return schema
