"""An object graph as plain data, and back, without running anything the data names.

Why: a pickle runs whatever callable its bytes name, so a snapshot planted by another uid
would run code with the daemon's uid. This codec writes JSON-compatible values plus one
binary section, and reads them back building only a fixed set of types.

The stream (before zlib): one line of JSON (the document), a newline, the binary section
(raw bytes of arrays and byte strings, referenced from the document by offset/length).

Values:
- str, int, bool, None, finite float: themselves; inf/nan: {"$": "float", "v": "inf"}.
- list: a JSON array; a dict whose keys are all str and none is "$": a JSON object.
- tagged ({"$": tag, ...}): "tuple", "set", "fset", "deque" (items, maxlen), "dict" (k, v:
  other keys), "bytes"/"bytearray" (at, n), "nd" (numpy array: dt = dtype.str, sh = shape,
  at, n, ro = read-only), "npscalar" (a 0-d nd), "array" (array.array: tc, at, n),
  "random" (random.Random.getstate()), "npgen" (a numpy Generator: bg = bit generator
  name from a fixed table, state), "enum" (c = class index, name), "obj" (c = class index,
  f = fields), "ref" (i = memo slot).
- Shared references and cycles: every container, array and object takes the next memo
  slot when it is first met (in document order, both ways); later meetings are "ref"s.
  A cycle through a tuple or frozenset (immutable, built after its items) is refused.

Classes: only from the project's own packages (module `pool.*` or `daemon.*`, the name a
class defined in that module), listed once in a class table with a fingerprint of their
field names: for attrs classes their fields, for slotted classes their slots, for the
others the names their methods assign on `self` (read from the source with `ast`). The
decoder checks every fingerprint before it builds anything, creates instances with
``object.__new__`` and sets fields through ``__dict__`` or the slot descriptors: it never
calls a constructor, ``__setstate__``, ``__reduce__`` or any callable named by the data.
Anything else (an unknown tag, a class outside the allowlist, a malformed value) raises
PlainDataError with one line.
"""

from __future__ import annotations

import array
import ast
import enum
import functools
import hashlib
import importlib
import inspect
import json
import math
import random
import re
import sys
import textwrap
import types
import zlib
from collections import deque
from typing import Any

import attrs
import numpy as np


class PlainDataError(ValueError):
    """Data this codec cannot write or read (one line)."""


SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN_ITEMS = frozenset({str, int, bool, type(None), float})
_MODULE = re.compile(r"^(pool|daemon)(\.[a-z_][a-z0-9_]*)*$")
_QUALNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_DTYPE = re.compile(r"^[<>|=][biufcmMSU][0-9]{1,3}(\[[A-Za-z0-9]+\])?$")
_BIT_GENERATORS: dict[str, type[np.random.BitGenerator]] = {
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "MT19937": np.random.MT19937,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
}
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _float_plain(x: float) -> Any:
    if math.isfinite(x):
        return x
    return {"$": "float", "v": "nan" if x != x else ("inf" if x > 0 else "-inf")}


def _plain_list(values: Any) -> bool:
    """Every item a scalar or finite float: JSON can take the list as it is (C speed)."""
    kinds = set(map(type, values))
    if not kinds <= _PLAIN_ITEMS:
        return False
    return float not in kinds or all(map(math.isfinite, (v for v in values if type(v) is float)))


# ---- class schema (field names read from the code) ----------------------------------------


def project_class(cls: type) -> bool:
    """A class of the project's own packages (the _MODULE pattern: pool.*, daemon.*)."""
    return bool(_MODULE.match(cls.__module__))


def _self_assignments(cls: type) -> set[str]:
    """Names the class's own methods assign on their first parameter (``self.x = ...``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return set()
    names: set[str] = set()
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.args.args:
            continue
        me = node.args.args[0].arg
        for sub in ast.walk(node):
            targets: list[ast.expr] = []
            if isinstance(sub, ast.Assign):
                targets = list(sub.targets)
            elif isinstance(sub, ast.AnnAssign | ast.AugAssign):
                targets = [sub.target]
            while targets:
                t = targets.pop()
                if isinstance(t, ast.Tuple | ast.List):
                    targets.extend(t.elts)
                elif (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == me
                ):
                    names.add(t.attr)
    return names


@attrs.frozen
class ClassInfo:
    """How instances of one project class are written and read."""

    cls: type
    name: str  # module:qualname
    fields: tuple[str, ...]  # sorted
    slots: dict[str, Any]  # slot name -> its member descriptor
    has_dict: bool
    fingerprint: str

    @property
    def field_set(self) -> frozenset[str]:
        return frozenset(self.fields)


@functools.cache
def class_info(cls: type) -> ClassInfo:
    """The schema of a project class; PlainDataError for one the codec cannot hold."""
    name = f"{cls.__module__}:{cls.__qualname__}"
    for base in cls.__mro__[1:]:
        if base is not object and not project_class(base) and base.__module__ != "typing":
            raise PlainDataError(f"class {name} derives from {base.__module__}.{base.__name__}")
    if cls.__new__ is not object.__new__:  # type: ignore[comparison-overlap]
        raise PlainDataError(f"class {name} has its own __new__")
    slots: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for key, value in vars(klass).items():
            if type(value) is types.MemberDescriptorType:
                slots[key] = value
    has_dict = "__dict__" in dir(cls) and any("__dict__" in vars(k) for k in cls.__mro__)
    fields = set(slots)
    if attrs.has(cls):
        fields |= {a.name for a in attrs.fields(cls)}
    if has_dict:
        for klass in cls.__mro__:
            if project_class(klass):
                fields |= _self_assignments(klass)
    ordered = tuple(sorted(fields))
    digest = hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:16]
    return ClassInfo(cls, name, ordered, slots, has_dict, digest)


@functools.cache
def enum_fingerprint(cls: type[enum.Enum]) -> str:
    return hashlib.sha256("\n".join(sorted(cls.__members__)).encode()).hexdigest()[:16]


def resolve_class(name: object) -> type:
    """The project class `name` ("module:qualname") names; PlainDataError otherwise."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise PlainDataError(f"class name {name!r:.80} is not module:qualname")
    module, qual = name.split(":")
    if not _MODULE.match(module) or not _QUALNAME.match(qual) or "__" in module + qual:
        raise PlainDataError(f"class {name!r:.80} is outside the pool and daemon packages")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = vars(obj)[part]
    except (ImportError, KeyError, TypeError):
        raise PlainDataError(f"class {name} does not exist in this version") from None
    if not isinstance(obj, type) or obj.__module__ != module:
        raise PlainDataError(f"{name} is not a class defined in {module}")
    return obj


# ---- encoding -------------------------------------------------------------------------------


class Encoder:
    """Writes one graph; `classes` (the class table) and `binary` accumulate."""

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # temporaries whose id() must stay unique
        self.building: set[int] = set()  # tuples/frozensets whose items are being written
        self.classes: dict[type, int] = {}
        self.table: list[list[str]] = []
        self.binary = bytearray()

    def class_table(self) -> list[list[str]]:
        """[[name, kind, fingerprint], ...] in class-index order."""
        return self.table

    def _class_index(self, cls: type, kind: str, fingerprint: str, name: str) -> int:
        i = self.classes.get(cls)
        if i is None:
            i = self.classes[cls] = len(self.table)
            self.table.append([name, kind, fingerprint])
        return i

    def _blob(self, data: Any) -> tuple[int, int]:
        at = len(self.binary)
        self.binary += data
        return at, len(self.binary) - at

    def encode(self, x: Any) -> Any:
        try:
            return self._enc(x)
        except RecursionError:
            raise PlainDataError("the graph is nested too deeply") from None

    def _slot(self, x: Any) -> Any:
        """None if `x` takes a new memo slot, else its "ref"."""
        i = self.memo.get(id(x))
        if i is not None:
            if id(x) in self.building:
                raise PlainDataError(f"a cycle runs through a {type(x).__name__} (immutable)")
            return {"$": "ref", "i": i}
        self.memo[id(x)] = len(self.memo)
        return None

    def _items(self, values: Any) -> list[Any]:
        if _plain_list(values):
            return list(values)
        return [self._enc(v) for v in values]

    def _enc(self, x: Any) -> Any:
        t = type(x)
        if t in SCALARS:
            return x
        if t is float:
            return _float_plain(x)
        ref = self._slot(x)
        if ref is not None:
            return ref
        try:
            return self._enc_new(x, t)
        except PlainDataError as exc:
            raise PlainDataError(f"{exc} (in a {t.__module__}.{t.__qualname__})") from None

    def _enc_new(self, x: Any, t: type) -> Any:
        if t is list:
            return x if _plain_list(x) else [self._enc(v) for v in x]
        if t is dict:
            if set(map(type, x)) <= {str} and "$" not in x:
                if _plain_list(x.values()):
                    return x
                return {k: self._enc(v) for k, v in x.items()}
            return {"$": "dict", "k": self._items(x.keys()), "v": self._items(x.values())}
        if t is tuple or t is frozenset:
            self.building.add(id(x))
            items = self._items(x)
            self.building.discard(id(x))
            return {"$": "tuple" if t is tuple else "fset", "items": items}
        if t is set:
            return {"$": "set", "items": self._items(x)}
        if t is deque:
            return {"$": "deque", "items": self._items(x), "maxlen": x.maxlen}
        if t is bytes or t is bytearray:
            at, n = self._blob(x)
            return {"$": t.__name__, "at": at, "n": n}
        if t is np.ndarray:
            return self._ndarray(x)
        if t is array.array:
            at, n = self._blob(memoryview(x).cast("B"))
            return {"$": "array", "tc": x.typecode, "at": at, "n": n, "bo": sys.byteorder}
        if t is random.Random:
            version, internal, gauss = x.getstate()
            return {"$": "random", "version": version, "state": list(internal), "gauss": gauss}
        if t is np.random.Generator:
            bg = x.bit_generator
            bgname = type(bg).__name__
            if _BIT_GENERATORS.get(bgname) is not type(bg):
                raise PlainDataError(f"numpy bit generator {bgname} is not supported")
            state = bg.state
            self.keep.append(state)
            return {"$": "npgen", "bg": bgname, "state": self._enc(state)}
        if isinstance(x, np.generic):
            arr = np.asarray(x)
            self.keep.append(arr)
            return {"$": "npscalar", "a": self._ndarray(arr)}
        if isinstance(x, enum.Enum) and project_class(t):
            i = self._class_index(
                t, "enum", enum_fingerprint(t), f"{t.__module__}:{t.__qualname__}"
            )
            return {"$": "enum", "c": i, "name": x.name}
        if isinstance(t, type) and project_class(t) and not isinstance(x, type):
            return self._object(x, t)
        raise PlainDataError(f"cannot store a {t.__module__}.{t.__qualname__}: not data")

    def _ndarray(self, x: np.ndarray[Any, Any]) -> Any:
        dt = x.dtype
        if dt.hasobject or dt.fields is not None or not _DTYPE.match(dt.str):
            raise PlainDataError(f"numpy arrays of dtype {dt} cannot be stored as raw bytes")
        raw: Any = np.ascontiguousarray(x)
        at, n = self._blob(memoryview(raw).cast("B"))
        return {
            "$": "nd",
            "dt": dt.str,
            "sh": list(x.shape),
            "at": at,
            "n": n,
            "ro": not x.flags.writeable,
        }

    def _object(self, x: Any, t: type) -> Any:
        info = class_info(t)
        i = self._class_index(t, "obj", info.fingerprint, info.name)
        fields: dict[str, Any] = {}
        if info.has_dict:
            d = vars(x)
            if not d.keys() <= info.field_set:
                extra = sorted(set(d) - info.field_set)
                raise PlainDataError(
                    f"{info.name} holds {extra}, which its class's code never assigns"
                )
            for k, v in d.items():
                fields[k] = self._enc(v)
        for k, desc in info.slots.items():
            try:
                v = desc.__get__(x, t)
            except AttributeError:
                continue  # an unset slot (a cached_property not computed yet)
            fields[k] = self._enc(v)
        return {"$": "obj", "c": i, "f": fields}


# ---- decoding -------------------------------------------------------------------------------

_UNBUILT = object()


class Decoder:
    """Reads one graph written by Encoder, given its class table and binary section."""

    def __init__(self, table: Any, binary: memoryview) -> None:
        self.memo: list[Any] = []
        self.binary = binary
        self.classes: list[tuple[str, Any]] = []
        if not isinstance(table, list):
            raise PlainDataError("the class table is not a list")
        for entry in table:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise PlainDataError(f"malformed class table entry {entry!r:.80}")
            name, kind, fingerprint = entry
            cls = resolve_class(name)
            if kind == "enum" and issubclass(cls, enum.Enum):
                now = enum_fingerprint(cls)
                self.classes.append(("enum", cls))
            elif kind == "obj" and not issubclass(cls, enum.Enum):
                info = class_info(cls)  # type: ignore[arg-type]
                now = info.fingerprint
                self.classes.append(("obj", info))
            else:
                raise PlainDataError(f"class {name} is not a {kind!r:.20}")
            if fingerprint != now:
                raise PlainDataError(
                    f"class {name} has other fields in this version than in the one that "
                    "wrote the data (a code upgrade changed it)"
                )

    def decode(self, p: Any) -> Any:
        try:
            return self._dec(p)
        except PlainDataError:
            raise
        except RecursionError:
            raise PlainDataError("the data is nested too deeply") from None
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
            raise PlainDataError(f"malformed data: {type(exc).__name__}: {exc}"[:300]) from None

    def _new_slot(self, value: Any) -> int:
        self.memo.append(value)
        return len(self.memo) - 1

    def _items(self, p: Any) -> list[Any]:
        if type(p) is not list:
            raise PlainDataError(f"expected a list of items, got {type(p).__name__}")
        if set(map(type, p)) <= _PLAIN_ITEMS:
            return p
        return [self._dec(v) for v in p]

    def _bytes(self, p: dict[str, Any]) -> memoryview:
        at, n = p["at"], p["n"]
        if not (
            type(at) is int and type(n) is int and at >= 0 and n >= 0 and at + n <= len(self.binary)
        ):
            raise PlainDataError(f"binary reference {at!r:.20}+{n!r:.20} out of range")
        return self.binary[at : at + n]

    def _dec(self, p: Any) -> Any:
        t = type(p)
        if t in _PLAIN_ITEMS:
            return p
        if t is list:
            self._new_slot(p)
            if not set(map(type, p)) <= _PLAIN_ITEMS:
                for i, v in enumerate(p):
                    p[i] = self._dec(v)
            return p
        if t is not dict:
            raise PlainDataError(f"unexpected {t.__name__}")
        tag = p.get("$")
        if tag is None:
            self._new_slot(p)
            for k, v in p.items():
                if type(v) not in _PLAIN_ITEMS:
                    p[k] = self._dec(v)
            return p
        if tag == "float":
            v = p["v"]
            if v not in _NONFINITE:
                raise PlainDataError(f"float {v!r:.20} not understood")
            return _NONFINITE[v]
        if tag == "ref":
            i = p["i"]
            if type(i) is not int or not 0 <= i < len(self.memo) or self.memo[i] is _UNBUILT:
                raise PlainDataError(f"reference {i!r:.20} to nothing built")
            return self.memo[i]
        method = (
            getattr(self, f"_tag_{tag}", None) if isinstance(tag, str) and tag.isalpha() else None
        )
        if method is None:
            raise PlainDataError(f"unknown tag {tag!r:.40}")
        return method(p)

    def _tag_dict(self, p: dict[str, Any]) -> Any:
        out: dict[Any, Any] = {}
        self._new_slot(out)
        keys, values = self._items(p["k"]), self._items(p["v"])
        if len(keys) != len(values):
            raise PlainDataError("a dict with more keys than values")
        out.update(zip(keys, values, strict=True))
        return out

    def _immutable(self, p: dict[str, Any], kind: type) -> Any:
        i = self._new_slot(_UNBUILT)
        value = kind(self._items(p["items"]))
        self.memo[i] = value
        return value

    def _tag_tuple(self, p: dict[str, Any]) -> Any:
        return self._immutable(p, tuple)

    def _tag_fset(self, p: dict[str, Any]) -> Any:
        return self._immutable(p, frozenset)

    def _tag_set(self, p: dict[str, Any]) -> Any:
        out: set[Any] = set()
        self._new_slot(out)
        out.update(self._items(p["items"]))
        return out

    def _tag_deque(self, p: dict[str, Any]) -> Any:
        maxlen = p["maxlen"]
        if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
            raise PlainDataError(f"deque maxlen {maxlen!r:.20}")
        out: deque[Any] = deque(maxlen=maxlen)
        self._new_slot(out)
        out.extend(self._items(p["items"]))
        return out

    def _tag_bytes(self, p: dict[str, Any]) -> Any:
        out = bytes(self._bytes(p))
        self._new_slot(out)
        return out

    def _tag_bytearray(self, p: dict[str, Any]) -> Any:
        out = bytearray(self._bytes(p))
        self._new_slot(out)
        return out

    def _ndarray(self, p: dict[str, Any]) -> Any:
        dt, shape = p["dt"], p["sh"]
        if not isinstance(dt, str) or not _DTYPE.match(dt):
            raise PlainDataError(f"numpy dtype {dt!r:.30} not allowed")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise PlainDataError(f"numpy shape {shape!r:.40} malformed")
        dtype = np.dtype(dt)
        raw = self._bytes(p)
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise PlainDataError(f"numpy array of shape {shape} and dtype {dt}: {len(raw)} bytes")
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        if p["ro"] is True:
            arr.flags.writeable = False
        return arr

    def _tag_nd(self, p: dict[str, Any]) -> Any:
        i = self._new_slot(_UNBUILT)
        self.memo[i] = self._ndarray(p)
        return self.memo[i]

    def _tag_npscalar(self, p: dict[str, Any]) -> Any:
        self._new_slot(_UNBUILT)
        a = p["a"]
        if type(a) is not dict or a.get("$") != "nd":
            raise PlainDataError("numpy scalar without its array")
        value = self._ndarray(a)[()]
        self.memo[-1] = value
        return value

    def _tag_array(self, p: dict[str, Any]) -> Any:
        tc = p["tc"]
        if not isinstance(tc, str) or len(tc) != 1 or tc not in array.typecodes:
            raise PlainDataError(f"array typecode {tc!r:.10} not understood")
        out = array.array(tc)
        out.frombytes(self._bytes(p))
        if p["bo"] != sys.byteorder:
            out.byteswap()
        self._new_slot(out)
        return out

    def _tag_random(self, p: dict[str, Any]) -> Any:
        out = random.Random()
        state = p["state"]
        if type(state) is not list or not all(type(v) is int for v in state):
            raise PlainDataError("random state malformed")
        gauss = p["gauss"]
        if gauss is not None and type(gauss) is not float:
            raise PlainDataError("random gauss state malformed")
        out.setstate((p["version"], tuple(state), gauss))
        self._new_slot(out)
        return out

    def _tag_npgen(self, p: dict[str, Any]) -> Any:
        kind = _BIT_GENERATORS.get(p["bg"]) if isinstance(p["bg"], str) else None
        if kind is None:
            raise PlainDataError(f"numpy bit generator {p['bg']!r:.30} not allowed")
        i = self._new_slot(_UNBUILT)
        bg = kind()
        bg.state = self._dec(p["state"])
        self.memo[i] = np.random.Generator(bg)
        return self.memo[i]

    def _class(self, c: Any, kind: str) -> Any:
        if type(c) is not int or not 0 <= c < len(self.classes) or self.classes[c][0] != kind:
            raise PlainDataError(f"class index {c!r:.20} is not a {kind} of the table")
        return self.classes[c][1]

    def _tag_enum(self, p: dict[str, Any]) -> Any:
        cls = self._class(p["c"], "enum")
        name = p["name"]
        if not isinstance(name, str) or name not in cls.__members__:
            raise PlainDataError(f"{cls.__qualname__} has no member {name!r:.40}")
        value = cls.__members__[name]
        self._new_slot(value)
        return value

    def _tag_obj(self, p: dict[str, Any]) -> Any:
        info: ClassInfo = self._class(p["c"], "obj")
        fields = p["f"]
        if type(fields) is not dict or not fields.keys() <= info.field_set:
            raise PlainDataError(f"{info.name}: fields not of its class")
        obj: Any = object.__new__(info.cls)
        self._new_slot(obj)
        d = obj.__dict__ if info.has_dict else None
        for k, v in fields.items():
            value = v if type(v) in _PLAIN_ITEMS else self._dec(v)
            desc = info.slots.get(k)
            if desc is not None:
                desc.__set__(obj, value)
            elif d is not None:
                d[k] = value
            else:
                raise PlainDataError(f"{info.name} has no place for field {k!r}")
        return obj


# ---- the stream -----------------------------------------------------------------------------


def pack(document: dict[str, Any], binary: bytes | bytearray, level: int = 1) -> bytes:
    """zlib(JSON line + newline + binary)."""
    head = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    z = zlib.compressobj(level)
    return z.compress(head) + z.compress(b"\n") + z.compress(binary) + z.flush()


def unpack(data: bytes) -> tuple[Any, memoryview]:
    """(document, binary section); PlainDataError if the stream is not zlib then JSON. A
    stream that is zlib but not JSON starts with `raw[:1]` (b"\\x80": a pickle)."""
    try:
        raw = zlib.decompress(data)
    except zlib.error:
        raise PlainDataError("not a zlib stream") from None
    end = raw.find(b"\n")
    try:
        if not raw.startswith(b"{") or end < 0:
            raise ValueError
        document = json.loads(raw[:end])
    except (ValueError, RecursionError):
        raise NotJson(raw[:1]) from None
    if not isinstance(document, dict):
        raise NotJson(raw[:1])
    return document, memoryview(raw)[end + 1 :]


class NotJson(PlainDataError):
    """The stream is zlib, but its content is not this codec's JSON line."""

    def __init__(self, first: bytes) -> None:
        super().__init__("the content is not JSON")
        self.pickle = first == b"\x80"


def dumps(value: Any) -> bytes:
    """One value as a self-contained stream (the class table inside)."""
    enc = Encoder()
    plain = enc.encode(value)
    return pack({"classes": enc.class_table(), "value": plain}, enc.binary)


def loads(data: bytes) -> Any:
    document, binary = unpack(data)
    if set(document) != {"classes", "value"}:
        raise PlainDataError("not a plaindata stream")
    return Decoder(document["classes"], binary).decode(document["value"])
