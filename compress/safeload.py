"""Read a torch ``.pt`` file's pickle without running it, and refuse what torchslim never writes.

torch's ``weights_only`` unpickler calls any allow-listed global with arguments the file
chooses: a 1 KB pickle that REDUCEs ``torch.nn.Linear(30000, 30000)`` allocates 3.6 GB.
Before torch unpickles anything, :func:`check_archive` walks the pickle's opcodes
(``pickletools`` decodes them, nothing executes) through a small symbolic stack machine
that mirrors torch's unpickler and rebuilds the object graph as inert nodes. The graph must
look like what ``torch.save`` writes for tensors, state dicts and modules:

- globals: the allow-listed module classes, torch's storage types, and four callables:
  ``_rebuild_tensor_v2``, ``_rebuild_parameter``, ``OrderedDict()`` and ``set(list)``;
- module classes only through NEWOBJ with no arguments (``__new__``, never ``__init__``),
  then one BUILD whose state is a module ``__dict__``: hook dicts empty, ``_modules`` holds
  modules, ``_parameters`` parameters, ``_buffers`` tensors, no key shadows a method;
- every storage names a record of the zip that holds exactly ``numel * itemsize`` bytes,
  stored uncompressed; every tensor view fits in its storage and declares no more elements
  than it holds; all views together at most twice the stored bytes;
- no reference cycles, nesting at most ``MAX_DEPTH`` deep, and the graph unrolled (what
  ``state_dict``, ``repr`` or ``json.dumps`` would walk) at most ``MAX_NODES`` nodes.

A file that names classes outside the allow-list raises :class:`NeedsTrust` (its
``names`` list them); anything else that fails raises :class:`AlteredFile`.
"""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from .pickle_scan import (
    AlteredFile,
    Archive,
    NeedsTrust,
    UnreadableFile,
    class_name,
    global_name,
    scan,
)

MAX_PICKLE_BYTES = 64 << 20  # the pickle of a 10 k-module model is a few MB
ALTERED = ("is not a file torchslim wrote, or it was altered; load it with --trust only if "
           "you trust its source")
__all__ = ["ALTERED", "AlteredFile", "NeedsTrust", "UnreadableFile", "check_archive",
           "load_checked", "pickle_globals", "is_zip"]


def read_archive(f: IO[bytes], size: int) -> Archive:
    """The zip's records, checked: stored (no compression bombs), unique, inside the file."""
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except Exception as exc:  # zipfile raises many types on crafted central directories
        raise UnreadableFile(f"its zip directory is unreadable ({type(exc).__name__})") from exc
    names = [i.filename for i in infos]
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1 or len(set(names)) != len(names):
        raise AlteredFile("its zip holds no single data.pkl, or holds a name twice")
    prefix = pkl[0][: -len("data.pkl")]
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise AlteredFile(f"record {i.filename} is compressed (torch stores records raw)")
        if i.flag_bits & 0x1 or not i.filename.startswith(prefix):
            raise AlteredFile(f"record {i.filename} is encrypted or outside {prefix}")
    if sum(i.file_size for i in infos) > size:
        raise AlteredFile("its records claim more bytes than the file holds")
    info = zf.getinfo(pkl[0])
    if info.file_size > MAX_PICKLE_BYTES:
        raise AlteredFile(f"its pickle is {info.file_size} bytes, over {MAX_PICKLE_BYTES}")
    try:
        data = zf.read(info)
    except Exception as exc:  # bad CRC, truncated local header, ...
        raise UnreadableFile(f"its pickle record is unreadable ({type(exc).__name__})") from exc
    data_dir = prefix + "data/"
    records = {i.filename[len(data_dir):]: i.file_size for i in infos
               if i.filename.startswith(data_dir)}
    _same_as_torch(f, {i.filename[len(prefix):]: i.file_size for i in infos}, data)
    return Archive(prefix, data, records)


def _same_as_torch(f: IO[bytes], sizes: dict[str, int], pickle: bytes) -> None:
    """torch.load reads the zip with its own C++ reader (miniz): the records, sizes and
    pickle checked here must be the ones it will see, or a file crafted for the two
    parsers to disagree would pass the check with one content and load another."""
    reader_cls = getattr(torch._C, "PyTorchFileReader", None)
    if reader_cls is None or not hasattr(reader_cls, "get_record_size"):
        return  # an older torch: zipfile's view, checked above, is all there is
    f.seek(0)
    try:
        reader = reader_cls(f)
        theirs = {n: reader.get_record_size(n) for n in reader.get_all_records()}
        same_pickle = reader.get_record("data.pkl") == pickle
    except Exception as exc:  # miniz refuses what zipfile accepted
        raise UnreadableFile(f"torch cannot read its zip ({type(exc).__name__})") from exc
    if theirs != sizes or not same_pickle:
        raise AlteredFile("its zip reads differently in torch than in Python's zipfile")



# --- entry points ---------------------------------------------------------------------


def check_archive(f: IO[bytes], size: int, classes: Iterable[type] = ()) -> Archive:
    """Refuse (``AlteredFile`` / ``NeedsTrust``) a torch zip file that torch.save of
    tensors, containers and modules of ``classes`` would not have written. Runs nothing."""
    archive = read_archive(f, size)
    scan(archive, {class_name(c): c for c in classes})
    return archive


def pickle_globals(path: str | Path) -> list[str]:
    """Every GLOBAL a torch file's pickle names (``module.name``), read without running it:
    what a file needs importable, e.g. to tell a user which classes --trust would load."""
    path = Path(path)
    with open(path, "rb") as f:
        if is_zip(f):
            data = read_archive(f, path.stat().st_size).pickle
        else:
            f.seek(0)
            data = f.read(MAX_PICKLE_BYTES)
    found: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.add(global_name(arg))
            elif op.name == "STACK_GLOBAL":  # protocol 4+: names come from the stack
                found.add("<STACK_GLOBAL>")
    except (ValueError, UnicodeDecodeError) as exc:
        raise AlteredFile(f"its pickle is malformed ({type(exc).__name__})") from exc
    return sorted(found)


def load_checked(path: str | Path, classes: Iterable[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` after :func:`check_archive` passed on
    the same open file (so the checked bytes are the loaded bytes)."""
    path = Path(path)
    classes = list(classes)
    with open(path, "rb") as f:
        size = path.stat().st_size
        if not is_zip(f):
            raise UnreadableFile("it is not a torch zip archive (torch.save has written zip "
                                 "files since torch 1.6)")
        f.seek(0)
        check_archive(f, size, classes)
        f.seek(0)
        with torch.serialization.safe_globals(classes):
            return torch.load(f, map_location="cpu", weights_only=True)


def is_zip(f) -> bool:
    """zipfile.is_zipfile, which raises BadZipFile on some broken end records."""
    try:
        return zipfile.is_zipfile(f)
    except Exception:  # BadZipFile, ValueError, ...: not a zip torchslim can read
        return False
