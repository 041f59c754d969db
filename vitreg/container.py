"""The one file container for checkpoints and training states: safetensors plus JSON.

Tensors are stored as safetensors (never pickled); everything else goes into the file's
metadata, a string dict whose ``format`` names what the file is and whose other values are
JSON. Files are written atomically and read back whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vitreg import __version__
from vitreg.errors import VitregError
from vitreg.files import atomic_path, make_folder


def write_container(
    path: str | Path, tensors: dict[str, torch.Tensor], file_format: str, fields: dict
) -> Path:
    """Write ``tensors`` and the JSON-able ``fields`` (each JSON-encoded into the metadata,
    beside ``format`` and ``vitreg_version``) to ``path``, creating its folder."""
    path = Path(path)
    try:
        metadata = {key: json.dumps(value) for key, value in fields.items()}
    except TypeError as error:
        raise VitregError(f"{path}: the metadata must be JSON-serialisable ({error})") from None
    metadata.update(format=file_format, vitreg_version=__version__)
    stored = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    make_folder(path.parent, "folder")
    with atomic_path(path) as temporary:
        save_file(stored, str(temporary), metadata=metadata)
    return path


def read_container(
    path: str | Path, file_format: str, what: str, hint: str = ""
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The decoded fields (with ``vitreg_version``) and the tensors of a container file.

    ``what`` names the kind of file in messages (e.g. 'vitreg checkpoint'); a missing or
    unreadable file, or one of another format (then ``hint`` follows), is a VitregError.
    """
    path = Path(path)
    if not path.is_file():
        raise VitregError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise VitregError(f"{path}: not a {what} (safetensors: {error})") from None
    found = metadata.get("format")
    if found != file_format:
        expected = f"format {found!r}, expected {file_format!r}"
        raise VitregError(f"{path}: not a {what} ({expected}){hint}")
    try:
        fields = {
            key: json.loads(value)
            for key, value in metadata.items()
            if key not in ("format", "vitreg_version")
        }
    except json.JSONDecodeError as error:
        raise VitregError(f"{path}: malformed {what} metadata ({error})") from None
    fields["vitreg_version"] = metadata.get("vitreg_version", "unknown")
    return fields, tensors
