"""What a ``torch.save`` file holds, told from its pickle's opcodes without running them.

A ``state_dict`` (or a training checkpoint: ``{"epoch": 3, "model": state_dict, ...}``) is
weights without the model's class, so no loader can serve it; a pickled module names its class.
``pickletools.genops`` only parses opcodes, so this reads any file safely, and needs no torch:
every class or function the pickle would call is named by a ``GLOBAL`` opcode, and when each is
one that rebuilds tensors or plain data, the file cannot hold a model. Anything this cannot
decide (the legacy non-zip format, a damaged or huge pickle) answers None, and the loader
decides at load time as before.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

MAX_PICKLE = 16 * 2**20
"""A state_dict's pickle is a few bytes per tensor (the data lies beside it in the zip)."""

# The data-only names, after torch's own weights-only allowlist (torch/_weights_only_unpickler.py)
# plus numpy arrays, which training checkpoints often hold (metrics, random states).
_DATA_GLOBALS = {
    "collections": re.compile(r"OrderedDict|Counter"),
    "torch": re.compile(r"\w*Storage|Size|Tensor|device|bool|long|short|c?(half|double)|b?float\w*"
                        r"|cfloat|complex\w*|q?u?int\w*|bits\w*|per_\w+"),
    "torch._utils": re.compile(r"_rebuild_\w+"),
    "torch._tensor": re.compile(r"_rebuild_from_type_v2"),
    "torch.nn.parameter": re.compile(r"Parameter|Buffer"),
    "torch.serialization": re.compile(r"_get_layout"),
    "torch.storage": re.compile(r"TypedStorage|UntypedStorage"),
    "_codecs": re.compile(r"encode"),
    "builtins": re.compile(r"set|frozenset|bytearray|complex|slice"),
    "__builtin__": re.compile(r"set|frozenset|bytearray|complex|slice"),
    "numpy": re.compile(r"ndarray|dtype"),
    "numpy.core.multiarray": re.compile(r"_reconstruct|scalar"),
    "numpy._core.multiarray": re.compile(r"_reconstruct|scalar"),
    "numpy.core.numeric": re.compile(r"_frombuffer"),
    "numpy._core.numeric": re.compile(r"_frombuffer"),
}


def _data_only_global(reference: str) -> bool:
    module, _, name = reference.partition(" ")
    pattern = _DATA_GLOBALS.get(module)
    return pattern is not None and pattern.fullmatch(name) is not None


def saved_tensors_only(path: Path) -> bool | None:
    """True: a ``torch.save`` zip whose pickle references nothing but tensor and data
    rebuilders (a state_dict, an optimizer state, a dict of them). False: it names some other
    class or function (a pickled module, say). None: cannot tell without running it."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [info for info in archive.infolist() if info.filename.endswith("data.pkl")
                       and info.filename.count("/") == 1]
            if len(entries) != 1 or entries[0].file_size > MAX_PICKLE:
                return None
            with archive.open(entries[0]) as member:
                data = member.read(MAX_PICKLE + 1)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError):  # RuntimeError: encrypted
        return None
    if len(data) > MAX_PICKLE:
        return None
    try:
        return _references_data_only(data)
    except (ValueError, EOFError):  # not a complete pickle
        return None


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _references_data_only(data: bytes) -> bool | None:
    # Protocol 4 names a global by pushing two strings (or fetching them from the memo) before
    # STACK_GLOBAL: the last two values pushed are followed, strings or None for anything else.
    memo: dict[int, str | None] = {}
    last: list[str | None] = [None, None]
    for opcode, argument, _ in pickletools.genops(data):
        name = opcode.name
        index = argument if isinstance(argument, int) else -1
        if name == "MEMOIZE":
            memo[len(memo)] = last[-1]
            continue
        if name in _PUTS:
            memo[index] = last[-1]
            continue
        if name in ("EXT1", "EXT2", "EXT4"):
            return None  # a name from the copyreg registry: not followed
        if name in ("GLOBAL", "INST"):
            reference: str | None = str(argument)
        elif name == "STACK_GLOBAL":
            module, attribute = last
            reference = f"{module} {attribute}" if module and attribute else None
            if reference is None:
                return None
        else:
            reference = None
        if reference is not None and not _data_only_global(reference):
            return False
        value = argument if name in _STRINGS else memo.get(index) if name in _GETS else None
        last = [last[-1], value if isinstance(value, str) else None]
    return True
