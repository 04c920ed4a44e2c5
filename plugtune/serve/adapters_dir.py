"""Where run-time adapter loading may read from: only inside the directories the operator named
(`plugtune serve --adapters-dir DIR`).

A client-supplied path is resolved with every symlink followed (os.path.realpath) and must land
inside one of those directories, and so must every file of the adapter: a symlink inside the
directory that points elsewhere (`evil -> /etc`) is refused like `../../etc`. Relative paths are
looked up under each directory in turn.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from plugtune.adapters.io import CONFIG_FILE

# Adapter names become keys of torch ModuleDicts (no '.'), URL-safe model ids, and metric labels.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


class AdapterPathError(ValueError):
    """A path that is not an allowed adapter directory; the message says why."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterPathError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting "
                               "with a letter or digit")
    return name


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_adapter_dir(path: str, roots: list[str | Path]) -> Path:
    """The real path of the adapter directory `path` (absolute, or relative to one of `roots`),
    after checking that it and all its files stay inside a root."""
    if not roots:
        raise AdapterPathError("run-time adapter loading is off: start the server with --adapters-dir DIR to allow "
                               "loading adapters from DIR")
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise AdapterPathError("lora_path must be a non-empty path")
    if ".." in Path(path).parts:
        raise AdapterPathError(f"lora_path {path!r} contains '..': path traversal is not allowed")
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    for cand in candidates:
        real = os.path.realpath(cand)
        root = next((r for r in real_roots if _inside(real, r)), None)
        if root is None:
            if os.path.isabs(path):
                raise AdapterPathError(f"lora_path {path!r} is outside the adapter directories "
                                       f"({', '.join(map(str, roots))})")
            if os.path.lexists(cand):  # exists, but a symlink takes it out of its root
                raise AdapterPathError(f"lora_path {path!r} resolves to {real}, outside the adapter directories "
                                       "(symlinks may not leave them)")
            continue
        if not os.path.isdir(real):
            continue
        if not os.path.isfile(os.path.join(real, CONFIG_FILE)):
            raise AdapterPathError(f"{path!r} is not an adapter directory: {CONFIG_FILE} is missing")
        for entry in os.scandir(real):  # each file must stay inside too (no symlinked weights)
            if not _inside(os.path.realpath(entry.path), root):
                raise AdapterPathError(f"{path!r}: {entry.name} is a symlink to outside the adapter directories")
        return Path(real)
    raise AdapterPathError(f"no adapter directory {path!r} under {', '.join(map(str, roots))}")
