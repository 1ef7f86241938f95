"""The output folder, written atomically: everything goes into a temporary folder beside it, then moves in.

A new folder is one rename. Into a folder that exists already, each file moves in with its own
rename, after every file has been fully written, so a crash never leaves a half-written file; files
that would overwrite the input model or its data are refused before any work is done.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pruneaug.errors import OutputError


class OutputFolder:
    """`with OutputFolder(out, protected) as staging:` write into `staging`; on success the files land in `out`."""

    def __init__(self, out: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()):
        self.out = Path(out)
        self.protected = {Path(p).resolve() for p in protected}
        self.staging: Path | None = None

    def check(self, names: Iterable[str]) -> None:
        """Refuse clashes with the input and unusable folders before the compile starts."""
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out}: exists and is not a folder")
        existing = self.out.resolve()  # the folder the output, or the folders leading to it, will be made in
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problem = "is not a folder" if not existing.is_dir() else "is not writable"
            raise OutputError(f"--out {self.out}: cannot write there: {existing} {problem}")
        for name in names:
            target = (self.out / name).resolve()
            if target in self.protected:
                raise OutputError(f"--out {self.out}: writing {name} there would overwrite the input model or its data; "
                                  "choose another output folder")

    def __enter__(self) -> Path:
        parent = self.out.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=parent))
        except OSError as err:
            raise OutputError(f"--out {self.out}: cannot write there: {err.strerror or err}") from None
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.staging is not None
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        try:
            self._publish()
        except OSError as err:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise OutputError(f"--out {self.out}: cannot write there: {err.strerror or err}") from None

    def _publish(self) -> None:
        assert self.staging is not None
        if not self.out.exists():
            os.rename(self.staging, self.out)
            return
        for item in sorted(self.staging.iterdir()):
            os.replace(item, self.out / item.name)
        self.staging.rmdir()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_masks(path: Path, masks: dict[str, np.ndarray]) -> None:
    """Masks keyed by weight name, each in the weight's own ONNX layout (what a training loop multiplies by)."""
    with open(path, "wb") as file:
        np.savez_compressed(file, **masks)
