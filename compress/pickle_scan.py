"""The pickle of a torch zip file, replayed by a symbolic stack machine that runs nothing.

:class:`Machine` mirrors torch's weights-only unpickler opcode by opcode (``pickletools``
decodes them) and builds the object graph as inert nodes; :func:`check_graph` and
:func:`check_module` then judge the finished graph (see safeload.py for the rules and why).
"""

from __future__ import annotations

import functools
import inspect
import pickletools
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import TorchslimError

MAX_DEPTH = 200  # nesting of containers; a module level costs 3 (module, __dict__, _modules)
MAX_NODES = 2_000_000  # the object graph unrolled along every path
# Objects the check itself may build (~100 B each): a 6,000-module model needs ~1 M; a file
# of 1-byte EMPTY_DICT opcodes must not make the check take gigabytes.
MAX_OBJECTS = 1_000_000
VIEW_SLACK_BYTES = 1 << 20  # views may exceed the stored bytes by 2x + this (tied weights)


# The opcodes torch.save (pickle protocol 2) emits; torch's weights-only unpickler reads
# a few more, which a file torchslim wrote never holds.
_OPCODES = {
    "PROTO", "STOP", "GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "APPEND", "APPENDS",
    "SETITEM", "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2",
    "LONG1", "BINFLOAT", "BINUNICODE", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT",
    "LONG_BINPUT",
}
_CALLS = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
          "collections.OrderedDict", "builtins.set"}
_PRIMITIVE = (bool, int, float, str, bytes, type(None))

class AlteredFile(TorchslimError):
    """The pickle asks for something torch.save never writes: refused before unpickling."""


class UnreadableFile(AlteredFile):
    """Not a torch zip archive at all, or one whose zip structure is broken or truncated."""


class NeedsTrust(TorchslimError):
    """The pickle names classes outside the allow-list: only ``--trust`` may load it."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names



@dataclass
class Archive:
    prefix: str  # the folder every record sits in ("archive/", ".m.pt.abc123/", ...)
    pickle: bytes
    records: dict[str, int]  # storage key -> bytes stored


# --- inert nodes the symbolic unpickler builds ----------------------------------------


class _Glob:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


@dataclass(eq=False, slots=True)
class _Obj:  # a module instance: NEWOBJ of an allow-listed class, then BUILD
    cls: type
    state: Any = None


@dataclass(eq=False, slots=True)
class _Dict:
    ordered: bool = False
    items: dict = field(default_factory=dict)
    attrs: Any = None  # BUILD on an OrderedDict: a state_dict's ``_metadata``


@dataclass(eq=False, slots=True)
class _Seq:
    kind: str  # "list" | "tuple" | "set"
    items: list


@dataclass(eq=False, slots=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(eq=False, slots=True)
class _Tensor:
    storage: _Storage
    nbytes: int


@dataclass(eq=False, slots=True)
class _Param:
    tensor: _Tensor


class _Mark:
    pass


def _children(node) -> list:
    if isinstance(node, _Obj):
        return [node.state]
    if isinstance(node, _Dict):
        return [*node.items.values(), node.attrs] if node.attrs is not None else list(
            node.items.values())
    if isinstance(node, _Seq):
        return node.items
    if isinstance(node, _Param):
        return [node.tensor]
    return []


# --- the symbolic unpickler -----------------------------------------------------------


def global_name(arg: str) -> str:
    module, _, name = arg.partition(" ")
    if (module, name) in NAME_MAPPING:  # protocol 2 spells builtins as __builtin__
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _storage_dtypes() -> dict[str, torch.dtype]:
    return {f"torch.{ts.__name__}": torch.serialization.StorageType(ts.__name__).dtype
            for ts in torch._storage_classes
            if ts.__module__ == "torch" and ts.__name__.endswith("Storage")
            and ts.__name__ not in ("TypedStorage", "UntypedStorage")}


class Machine:
    """Mirrors torch's weights-only unpickler opcode by opcode, building inert nodes."""

    def __init__(self, archive: Archive, classes: dict[str, type]):
        self.archive, self.classes = archive, classes
        self.dtypes = _storage_dtypes()
        self.stack: list = []
        self.meta: list[list] = []
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, _Storage] = {}
        self.tensors: list[_Tensor] = []
        self.foreign: set[str] = set()
        self.objs: list[_Obj] = []
        self.hook_dicts: list[_Dict] = []  # given to tensors: must still be empty at STOP
        self.made = 0

    def run(self) -> Any:
        try:
            for op, arg, _pos in pickletools.genops(self.archive.pickle):
                if op.name not in _OPCODES:
                    raise AlteredFile(f"its pickle uses opcode {op.name}, which torch.save "
                                      "never writes")
                if op.name == "STOP":
                    return self._pop()
                self.step(op.name, arg)
        except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise AlteredFile(f"its pickle is malformed ({type(exc).__name__})") from exc
        raise AlteredFile("its pickle has no STOP")

    def _push(self, node) -> None:
        self.made += 1
        if self.made > MAX_OBJECTS:
            raise AlteredFile(f"its pickle builds over {MAX_OBJECTS} objects")
        self.stack.append(node)  # not a bound append: MARK and TUPLE swap self.stack

    def _pop(self):
        if not self.stack or isinstance(self.stack[-1], _Mark):
            raise AlteredFile("its pickle pops an empty stack")
        return self.stack.pop()

    def _pop_mark(self) -> list:
        items, self.stack = self.stack, self.meta.pop()
        return items

    def step(self, name: str, arg) -> None:  # noqa: C901 (one branch per opcode, like pickle)
        push = self._push
        if name == "PROTO":
            if arg != 2:
                raise AlteredFile(f"its pickle is protocol {arg}; torch.save writes 2")
        elif name == "MARK":
            self.meta.append(self.stack)
            self.stack = []
        elif name in ("BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            push(self.memo[arg])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            push({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE"):
            push(arg)
        elif name == "EMPTY_TUPLE":
            push(_Seq("tuple", []))
        elif name == "EMPTY_LIST":
            push(_Seq("list", []))
        elif name == "EMPTY_DICT":
            push(_Dict())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self._pop() for _ in range(n)][::-1]
            push(_Seq("tuple", items))
        elif name == "TUPLE":
            push(_Seq("tuple", self._pop_mark()))
        elif name in ("APPEND", "APPENDS"):
            items = [self._pop()] if name == "APPEND" else self._pop_mark()
            target = self.stack[-1]
            if not (isinstance(target, _Seq) and target.kind == "list"):
                raise AlteredFile("its pickle appends to something that is not a list")
            target.items.extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            flat = self._pop_mark() if name == "SETITEMS" else [*self._pop2()]
            self._setitems(flat)
        elif name == "GLOBAL":
            push(self._global(global_name(arg)))
        elif name == "BINPERSID":
            push(self._storage(self._pop()))
        elif name == "REDUCE":
            args, func = self._pop(), self._pop()
            push(self._call(func, args))
        elif name == "NEWOBJ":
            args, cls = self._pop(), self._pop()
            push(self._new(cls, args))
        elif name == "BUILD":
            self._build(self._pop(), self.stack[-1])

    def _pop2(self):
        v, k = self._pop(), self._pop()
        return k, v

    def _setitems(self, flat: list) -> None:
        target = self.stack[-1]
        if not isinstance(target, _Dict) or len(flat) % 2:
            raise AlteredFile("its pickle sets items on something that is not a dict")
        for k, v in zip(flat[::2], flat[1::2], strict=True):
            if not isinstance(k, _PRIMITIVE):
                raise AlteredFile("its pickle uses a dict key that is not a plain value")
            target.items[k] = v

    def _global(self, name: str):
        if name in _CALLS or name in self.dtypes:
            return _Glob(name)
        if name in self.classes:
            return _Glob(name)
        self.foreign.add(name)
        return _Glob(name)

    def _storage(self, pid) -> _Storage:
        items = pid.items if isinstance(pid, _Seq) and pid.kind == "tuple" else None
        if not items or len(items) != 5 or items[0] != "storage":
            raise AlteredFile("its pickle loads something that is not a tensor storage")
        _, cls, key, location, numel = items
        dtype = self.dtypes.get(getattr(cls, "name", None))
        if dtype is None or not isinstance(key, str) or not isinstance(location, str):
            raise AlteredFile("a storage names no known tensor type")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise AlteredFile(f"storage {key} declares {numel!r} elements")
        stored = self.archive.records.get(key)
        if stored is None or stored != numel * dtype.itemsize:
            raise AlteredFile(
                f"storage {key} declares {numel} x {dtype} but the file holds "
                f"{stored if stored is not None else 'no'} bytes for it")
        known = self.storages.setdefault(key, _Storage(dtype, key, numel))
        if (known.dtype, known.numel) != (dtype, numel):
            raise AlteredFile(f"storage {key} is declared twice with different sizes")
        return known

    def _call(self, func, args):
        name = getattr(func, "name", None)
        if not isinstance(func, _Glob) or name not in _CALLS:
            shown = name or type(func).__name__.strip("_")
            raise AlteredFile(f"its pickle calls {shown}; torch.save only calls tensor "
                              "rebuilders and containers")
        if not (isinstance(args, _Seq) and args.kind == "tuple"):
            raise AlteredFile(f"{name} is called without an argument tuple")
        a = args.items
        if name == "collections.OrderedDict":
            if a:
                raise AlteredFile("OrderedDict is called with arguments")
            return _Dict(ordered=True)
        if name == "builtins.set":
            if len(a) != 1 or not _is_list_of(a[0], _PRIMITIVE):
                raise AlteredFile("set() is called on something that is not a list of values")
            return _Seq("set", list(a[0].items))
        if name == "torch._utils._rebuild_parameter":
            if len(a) != 3 or not isinstance(a[0], _Tensor) or not isinstance(a[1], bool) \
                    or not empty_dict(a[2]):
                raise AlteredFile("a parameter is rebuilt from unusual arguments (hooks?)")
            self.hook_dicts.append(a[2])
            return _Param(a[0])
        return self._tensor(a)

    def _tensor(self, a: list) -> _Tensor:
        if len(a) not in (6, 7) or not isinstance(a[0], _Storage) or not empty_dict(a[5]) \
                or (len(a) == 7 and not (a[6] is None or empty_dict(a[6]))):
            raise AlteredFile("a tensor is rebuilt from unusual arguments (hooks or metadata)")
        storage, offset, size, stride, grad = a[:5]
        dims = _int_tuple(size), _int_tuple(stride)
        if dims[0] is None or dims[1] is None or len(dims[0]) != len(dims[1]) \
                or not isinstance(offset, int) or offset < 0 or not isinstance(grad, bool):
            raise AlteredFile(f"a tensor of storage {storage.key} has a malformed shape")
        size, stride = dims
        numel = 1
        for s in size:
            numel *= s
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if numel and (last >= storage.numel or numel > storage.numel):
            raise AlteredFile(
                f"a tensor views {numel} elements up to index {last} of storage "
                f"{storage.key}, which holds {storage.numel}")
        t = _Tensor(storage, numel * storage.dtype.itemsize)
        self.tensors.append(t)
        self.hook_dicts.append(a[5])  # torch keeps this very dict: filled later, hooks run
        return t

    def _new(self, cls, args):
        name = getattr(cls, "name", None)
        if not isinstance(args, _Seq) or args.kind != "tuple" or args.items:
            raise AlteredFile(f"its pickle creates {name} with constructor arguments")
        if name in self.foreign:
            return _Obj(object)  # a class only --trust may load; reported as foreign
        if name not in self.classes:
            raise AlteredFile(f"its pickle creates an object of {name or 'a non-class'}")
        obj = _Obj(self.classes[name])
        self.objs.append(obj)
        return obj

    def _build(self, state, inst) -> None:
        if isinstance(inst, _Obj) and inst.state is None:
            if not isinstance(state, _Dict) or state.ordered or state.attrs is not None:
                raise AlteredFile("its pickle gives a module a state that is not a dict")
            # __setstate__ copies the top level now: later SETITEMs on this dict do not
            # reach the module, so what is checked at the end is this copy.
            inst.state = _Dict(items=dict(state.items))
            if inst.cls is not object and issubclass(inst.cls, nn.RNNBase):
                _check_rnn(class_name(inst.cls), inst.state.items)  # its setstate runs now
        elif isinstance(inst, _Dict) and inst.ordered and inst.attrs is None:
            inst.attrs = state  # a state_dict's _metadata, checked with the graph
        else:
            raise AlteredFile("its pickle sets the state of something that is not a module")


def _is_list_of(node, types) -> bool:
    return isinstance(node, _Seq) and node.kind == "list" and all(
        isinstance(i, types) for i in node.items)


def empty_dict(node) -> bool:
    return isinstance(node, _Dict) and not node.items and node.attrs is None


def _int_tuple(node) -> list[int] | None:
    if not (isinstance(node, _Seq) and node.kind == "tuple") or len(node.items) > 16:
        return None
    ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in node.items)
    return list(node.items) if ok else None


# --- checks on the finished graph -----------------------------------------------------

# Class attributes that are None on nn.Module but, when set on an instance, replace the call:
# Module.__call__ runs ``_compiled_call_impl`` instead of ``_call_impl`` when it is set.
_CALL_PATH = ("_compiled_call_impl", "forward", "_call_impl", "_wrapped_call_impl", "__call__")
_PLAIN_CLASS_ATTRS = (bool, int, float, str, bytes, tuple, list, dict, set, frozenset,
                      type(None))


def dtype_names() -> set[str]:
    return {f"torch.{n}" for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


def check_graph(root, dtype_names: set[str]) -> None:
    """No cycles, no deep nesting, no DAG that unrolls into millions of nodes."""
    done: dict[int, tuple[int, int]] = {}  # id -> (height, unrolled size)
    active: set[int] = set()
    keep: list = []  # ids stay unique while we hold the nodes
    todo: list[tuple[Any, bool]] = [(root, False)]
    while todo:
        node, leaving = todo.pop()
        if isinstance(node, _Glob) and node.name not in dtype_names:
            raise AlteredFile(f"its pickle holds {node.name} as a value")
        if isinstance(node, _Storage | _Mark):
            raise AlteredFile("its pickle holds a bare storage")
        kids = _children(node)
        if not kids:
            continue
        nid = id(node)
        if leaving:
            stats = [done.get(id(k), (0, 1)) for k in kids]
            height = 1 + max(h for h, _ in stats)
            size = min(MAX_NODES + 1, 1 + sum(s for _, s in stats))
            if height > MAX_DEPTH or size > MAX_NODES:
                raise AlteredFile(f"its objects nest {height} deep / unroll to {size} nodes "
                                  f"(limits {MAX_DEPTH} / {MAX_NODES})")
            done[nid] = (height, size)
            active.discard(nid)
        elif nid in active:
            raise AlteredFile("its objects contain themselves (a reference cycle)")
        elif nid not in done:
            active.add(nid)
            keep.append(node)
            todo.append((node, True))
            todo.extend((k, False) for k in kids)


@functools.lru_cache(maxsize=4096)
def _shadows_method(cls: type, key: str) -> bool:
    try:
        attr = inspect.getattr_static(cls, key)
    except AttributeError:
        return False
    return not isinstance(attr, _PLAIN_CLASS_ATTRS)


def _str_dict(node, values: tuple[type, ...]) -> bool:
    return isinstance(node, _Dict) and node.attrs is None and all(
        isinstance(k, str) and isinstance(v, values) for k, v in node.items.items())


def check_module(obj: _Obj) -> None:
    name = f"{obj.cls.__module__}.{obj.cls.__qualname__}"
    st = obj.state
    if not isinstance(st, _Dict) or st.ordered or st.attrs is not None:
        raise AlteredFile(f"a {name} has no module state")
    items = st.items
    ok = (
        isinstance(items.get("training"), bool)
        and _str_dict(items.get("_modules"), (_Obj, type(None)))
        and _str_dict(items.get("_parameters"), (_Param, type(None)))
        and _str_dict(items.get("_buffers"), (_Tensor, _Param, type(None)))
        and all(isinstance(k, str) for k in items)
    )
    if not ok:
        raise AlteredFile(f"a {name}'s submodules, parameters or buffers are not what "
                          "torch stores there")
    for key, value in items.items():
        if "hook" in key and not (value is None or isinstance(value, bool)
                                  or empty_dict(value)):
            raise AlteredFile(f"a {name} carries {key} (hooks run code on every call)")
        if _shadows_method(obj.cls, key):
            raise AlteredFile(f"a {name}'s state replaces its method or property {key!r}")
        if key in _CALL_PATH and value is not None:
            raise AlteredFile(f"a {name} sets {key} (it would be called instead of forward)")
        if key != "_modules" and any(isinstance(n, _Obj) for n in walk(value)):
            raise AlteredFile(f"a {name} holds a module in {key!r}, outside _modules (a "
                              "module there can be called in place of its own code)")
    nonpersistent = items.get("_non_persistent_buffers_set")
    if nonpersistent is not None and not (isinstance(nonpersistent, _Seq)
                                          and nonpersistent.kind == "set"):
        raise AlteredFile(f"a {name}'s _non_persistent_buffers_set is not a set")
    if issubclass(obj.cls, nn.RNNBase):
        _check_rnn(name, items)


def _check_rnn(name: str, items: dict) -> None:
    """RNNBase.__setstate__ loops num_layers times unless weight names are stored (as
    every torch since 1.8 stores them): a file could make that loop run for hours."""
    groups = items.get("_all_weights")
    if not (isinstance(groups, _Seq) and groups.items
            and all(_is_list_of(g, str) and g.items for g in groups.items)):
        raise AlteredFile(f"a {name} stores no weight names (a pre-1.8 or altered file)")


def check_metadata(d: _Dict) -> None:
    """The ``_metadata`` attribute torch keeps on a state_dict: {module: {"version": n}}."""
    meta = d.attrs.items.get("_metadata") if isinstance(d.attrs, _Dict) else None
    ok = (isinstance(d.attrs, _Dict) and set(d.attrs.items) == {"_metadata"}
          and _str_dict(meta, (_Dict,))
          and all(_str_dict(v, _PRIMITIVE) for v in meta.items.values()))
    if not ok:
        raise AlteredFile("its state_dict carries attributes other than torch's _metadata")


def check_totals(m: Machine) -> None:
    stored = sum(s.numel * s.dtype.itemsize for s in m.storages.values())
    viewed = sum(t.nbytes for t in m.tensors)
    if viewed > 2 * stored + VIEW_SLACK_BYTES:
        raise AlteredFile(f"its tensors view {viewed} bytes of {stored} stored")



def scan(archive: Archive, classes: dict[str, type]) -> Any:
    """Replay ``archive``'s pickle and check the graph it builds; return its inert root."""
    machine = Machine(archive, classes)
    root = machine.run()
    if machine.foreign:
        names = sorted(machine.foreign)
        raise NeedsTrust(f"it names classes outside torchslim's safe list ({', '.join(names)})",
                         names)
    check_graph(root, dtype_names())
    for obj in machine.objs:
        check_module(obj)
    for node in walk(root):
        if isinstance(node, _Dict) and node.attrs is not None:
            check_metadata(node)
    if any(not empty_dict(d) for d in machine.hook_dicts):
        raise AlteredFile("a tensor's backward hooks are filled in after it was rebuilt")
    check_totals(machine)
    return root


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def walk(root):
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if id(node) not in seen:
            seen.add(id(node))
            yield node
            todo.extend(_children(node))
