"""Path confinement of the host agent: which recorded paths it may delete, and deleting them without a race.

A path is accepted when it is absolute, free of ".." and NUL, and both the directory entry it names and what
that entry resolves to (links followed) lie under one of the agent's roots (CONTRACT.md, "The host agent
protocol"). That check is the policy; it is not what keeps the delete inside the roots. swtpm runs as an
unprivileged user that owns the state directories, so it can swap a directory for a link between the check
and the delete. The delete therefore never resolves a path by name: it opens the root, then every component
below it with `O_NOFOLLOW` relative to the directory opened before, and unlinks, removes or walks (with
`shutil.rmtree(..., dir_fd=...)`) only entries of directories it holds open. A component that became a link
fails that path's delete; nothing outside the roots can be reached.

`confine_paths` checks a whole request and `delete_confined` deletes it, so that the server can check every
entry of a request (paths and anything else) before it deletes any; `files_beneath` reaches every file that a
delete would remove the way the delete does, for the agent's in-use check.
"""

import errno
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.agent.outcome import DeleteOutcome
from app.protocol import MAX_PATH_BYTES

# Without it shutil.rmtree follows a directory swapped for a link mid-walk; the agent must not run there.
if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - CPython on Linux always has it
    raise ImportError("shutil.rmtree cannot avoid symlink attacks on this platform")

_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRefused(Exception):
    """A requested path the agent will not delete; the message says which and why."""


@dataclass(frozen=True)
class ConfinedPath:
    """A requested path that passed the checks: the root it lies under and its components below that root."""

    path: str
    root: Path
    parts: tuple[str, ...]


def real_roots(roots: Sequence[Path]) -> tuple[Path, ...]:
    """The roots as real paths, deepest first, so that a path is confined to the innermost root holding it."""
    resolved = {Path(os.path.realpath(root)) for root in roots}
    return tuple(sorted(resolved, key=lambda root: (-len(root.parts), str(root))))


def confine_paths(roots: Sequence[Path], paths: Sequence[str]) -> list[ConfinedPath]:
    """Check every path against the roots (as `real_roots` gives them); raise PathRefused at the first refused one.

    Checking all before deleting any keeps a bad request from half-applying. It does blocking syscalls
    (realpath): call it in a worker thread.
    """
    return [_confine(roots, path) for path in paths]


def delete_confined(confined: Sequence[ConfinedPath]) -> DeleteOutcome:
    """Delete checked paths, each with everything in it, and after each the parent directories left empty.

    A delete that fails for another reason than the path being gone does not stop the others: each path
    deleted is progress the service's retry need not redo, and the failure answer makes it retry the lot.
    It does blocking syscalls: call it in a worker thread.
    """
    outcome = DeleteOutcome()
    for entry in confined:
        try:
            gone = _delete_beneath(entry)
        except OSError as exc:
            outcome.errors.append(f"cannot delete {entry.path}: {exc.strerror or exc}")
        else:
            (outcome.deleted if gone else outcome.missing).append(entry.path)
    return outcome


def _confine(roots: Sequence[Path], path: str) -> ConfinedPath:
    """Check one path and find the root it lies under; raise PathRefused if it is not one to delete.

    The entry named is the path with its directory resolved and its last component kept: a link inside a
    root that points inside a root is removed itself, never its target, which nobody named. A link whose
    target leaves the roots is refused even though only the link would go: a path whose real file lies
    elsewhere is not one this agent manages.
    """
    if "\x00" in path:
        raise PathRefused(f"path contains a NUL byte: {path!r}")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise PathRefused(f"path cannot be encoded for the filesystem: {path!r}") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathRefused(f"path is longer than {MAX_PATH_BYTES} bytes: {path[:80]!r}...")
    if not os.path.isabs(path):
        raise PathRefused(f"path is not absolute: {path}")
    if ".." in path.split("/"):
        raise PathRefused(f"path contains a '..' segment: {path}")
    # Without "..", normalising only drops "//", "/." and a trailing "/": "/r/vm/" names the directory "/r/vm".
    directory, name = os.path.split(os.path.normpath(path))
    try:
        entry = Path(os.path.realpath(directory), name)
        resolved = Path(os.path.realpath(path))
    except OSError as exc:  # a link changed while it was being resolved
        raise PathRefused(f"cannot resolve path {path}: {exc.strerror or exc}") from None
    root = _root_holding(roots, entry)
    if root is None:
        raise PathRefused(f"path is outside the agent's roots: {path}")
    if _root_holding(roots, resolved) is None:
        raise PathRefused(f"path resolves outside the agent's roots: {path}")
    return ConfinedPath(path=path, root=root, parts=entry.relative_to(root).parts)


def _root_holding(roots: Sequence[Path], path: Path) -> Path | None:
    """The first of `roots` that `path` lies strictly inside (whole components, the root itself excluded)."""
    return next((root for root in roots if path != root and path.is_relative_to(root)), None)


def _delete_beneath(entry: ConfinedPath) -> bool:
    """Delete one checked path through directory descriptors from its root; False when it was already gone.

    Either way the parents left empty are pruned: a path already gone may be the rest of an earlier delete
    whose pruning was cut short, and nothing would ever remove those directories otherwise.
    """
    *directories, name = entry.parts
    with ExitStack() as held:
        chain = _open_parents(entry, held)
        gone = len(chain) > len(directories) and _remove_entry(chain[-1], name)
        _prune_emptied(chain, directories)
    return gone


def files_beneath(entry: ConfinedPath) -> Iterator[tuple[int, str, str]]:
    """Every regular file that deleting `entry` would remove, reached as the delete reaches it (never through a link).

    Yields the open directory holding each file, its name there, and its real path, for a caller that opens the
    file relative to that directory while the walk holds it. A file or directory that vanishes during the walk is
    skipped, as the delete would find it gone; any other error is raised. Blocking: call it in a worker thread.
    """
    *directories, name = entry.parts
    location = entry.root.joinpath(*entry.parts)
    with ExitStack() as held:
        try:
            chain = _open_parents(entry, held)
        except OSError:
            return  # a parent is no directory now: the delete cannot reach the entry either, and fails that path
        found = _entry_of(chain[-1], name) if len(chain) > len(directories) else None
        if found is None:
            return
        if stat.S_ISREG(found.st_mode):
            yield chain[-1], name, str(location)
            return
        if not stat.S_ISDIR(found.st_mode):
            return
        try:
            walk = os.fwalk(name, dir_fd=chain[-1], follow_symlinks=False, onerror=_raise_unless_gone)
            for directory, _, names, directory_fd in walk:
                for file_name in names:
                    found = _entry_of(directory_fd, file_name)
                    if found is not None and stat.S_ISREG(found.st_mode):
                        yield directory_fd, file_name, str(location.parent / directory / file_name)
        except FileNotFoundError:
            return  # the directory itself vanished before the walk opened it


def _open_parents(entry: ConfinedPath, held: ExitStack) -> list[int]:
    """Open the root and each directory above the entry, never through a link; descriptors `held` closes.

    The list stops short where a parent is gone: the entry's own parent is the last one only when all are there.
    """
    chain = [held.enter_context(_opened(os.open(entry.root, _OPEN_DIRECTORY)))]
    for directory in entry.parts[:-1]:
        try:
            chain.append(held.enter_context(_opened(_open_directory_below(chain[-1], directory))))
        except FileNotFoundError:
            break
    return chain


def _raise_unless_gone(error: OSError) -> None:
    """os.fwalk's error handler: a directory that vanished mid-walk is skipped, any other error raised."""
    if not isinstance(error, FileNotFoundError):
        raise error


def _open_directory_below(parent: int, name: str) -> int:
    """Open the directory `name` of the open `parent`, never through a link; a descriptor the caller closes."""
    try:
        return os.open(name, _OPEN_DIRECTORY, dir_fd=parent)
    except OSError as exc:
        # O_NOFOLLOW | O_DIRECTORY on a link fails with ENOTDIR or ELOOP: say which it was.
        found = _entry_of(parent, name)
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and found is not None and stat.S_ISLNK(found.st_mode):
            raise OSError(
                errno.ELOOP, f"{name!r} is a link now, not a directory (it changed after the check)"
            ) from None
        raise


def _entry_of(parent: int, name: str) -> os.stat_result | None:
    """What `name` in the open `parent` is (links not followed), or None when there is no such entry."""
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextmanager
def _opened(descriptor: int) -> Iterator[int]:
    """Hold a directory descriptor for the block, and close it after."""
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _remove_entry(directory: int, name: str) -> bool:
    """Remove `name` from the open `directory`: a directory with all it holds, anything else (links too) itself.

    False when there is no such entry.
    """
    found = _entry_of(directory, name)
    if found is None:
        return False
    try:
        if stat.S_ISDIR(found.st_mode):
            # rmtree opens every directory relative to its parent and checks it is the one it listed, so
            # a directory swapped for a link mid-walk is refused, and links inside are unlinked as links.
            shutil.rmtree(name, dir_fd=directory)
        else:
            os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        # rmtree stops at an entry that vanished mid-walk: the path is gone only if all of it is.
        if _entry_of(directory, name) is not None:
            raise
        return False
    return True


def _prune_emptied(chain: Sequence[int], directories: Sequence[str]) -> None:
    """Remove the parent directories a delete left empty, deepest first, up to but never including the root.

    `chain[i]` holds the directory that contains `directories[i]`, and `chain[i + 1]` that directory itself (the
    chain stops short where a parent was gone); rmdir refuses a directory that is not empty, and a name that
    is now a link, so this stops at the first parent something else still lives in.
    """
    opened = directories[: len(chain) - 1]
    for parent, name in reversed(list(zip(chain, opened, strict=False))):
        try:
            os.rmdir(name, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EBUSY):
                return
            raise
