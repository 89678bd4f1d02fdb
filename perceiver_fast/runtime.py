"""Devices and output files, shared by the library's entry points (train, bench) and the CLI.

Errors are ordinary exceptions that name the argument: the library raises
them, the CLI prints them as one line.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Union

import torch

__all__ = ["resolve_device", "check_output_dir", "atomic_write"]


def resolve_device(device: Optional[Union[str, torch.device]], *, name: str = "device") -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (None: cuda when torch sees a GPU, else cpu).

    Raises ValueError, naming ``name``, for a string torch does not parse, another
    device type, or a CUDA device that is not there.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {str(device)!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_output_dir(path: str, *, name: str = "out") -> str:
    """Checks that ``path`` is, or can become, a writable folder, without creating it.

    Creating it is left to the first write, so a run rejected later (bad data, bad
    config) leaves no empty folder behind. Raises ValueError naming ``name``.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{name} must be a folder path, got {path!r}")
    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{name} {path!r} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {path!r}: the folder is not writable")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{name} {path!r}: cannot create the folder: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path!r}: cannot create the folder: {parent!r} is not writable")
    return path


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it to ``path``.

    A reader (or a crash) never sees a half-written file: ``path`` holds the old
    content or the new, complete one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the result is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
