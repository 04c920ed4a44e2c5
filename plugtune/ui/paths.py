"""Every path the page names is confined to the configured directories (the runs directory and the
data directories): resolved with every symlink followed, then required to lie inside one of them.
`../../etc/passwd` and a symlink `runs/evil -> /etc` are refused alike, with a message saying why."""
from __future__ import annotations

import os
from pathlib import Path


class UIPathError(ValueError):
    """A path outside the directories the UI may read or write; the message names them."""


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(path: str | os.PathLike, roots: list[Path], what: str = "path") -> Path:
    """The real path of `path` (absolute, or relative to the first root that holds it), which must
    lie inside one of `roots`. The path need not exist (an output directory to be made)."""
    text = str(path)
    if not text.strip() or "\x00" in text:
        raise UIPathError(f"{what} must be a non-empty path")
    if ".." in Path(text).parts:
        raise UIPathError(f"{what} {text!r} contains '..': path traversal is not allowed")
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [text] if os.path.isabs(text) else [os.path.join(r, text) for r in real_roots]
    existing = [c for c in candidates if os.path.lexists(c)]
    cand = existing[0] if existing else candidates[0]  # a new path: under the first root
    real = os.path.realpath(cand)
    if any(inside(real, r) for r in real_roots):
        return Path(real)
    if os.path.lexists(cand) and not os.path.isabs(text):
        raise UIPathError(f"{what} {text!r} resolves to {real}, outside the allowed directories "
                          f"({', '.join(map(str, roots))}): symlinks may not leave them")
    raise UIPathError(f"{what} {text!r} is outside the allowed directories ({', '.join(map(str, roots))})")


def relative_to_root(path: Path, roots: list[Path]) -> str:
    """`path` relative to the root that holds it (for display and for round trips through the page)."""
    real = os.path.realpath(path)
    for r in roots:
        rr = os.path.realpath(r)
        if inside(real, rr):
            return os.path.relpath(real, rr)
    raise UIPathError(f"{path} is outside the allowed directories")
