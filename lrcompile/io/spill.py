"""Scratch files, so that compiling a large model holds few weights and outputs in memory.

``Spill``: a scratch file for factors.

The factorize pass hands each layer's factors to ``Spill.store`` as soon as they exist: their
bytes are appended to one file and the pass keeps an ``onnx_ir.ExternalTensor`` pointing at them.
Saving then copies file to file (``copy_file_range``), never the whole model through memory.
The folder is the output's staging folder; it is removed with it.

``OutputStore``: batches of a model's outputs (reference outputs: an LM's logits for 32 x 256
tokens of a 152k vocabulary are 5 GB in float32) in ``.npy`` files of a private temporary folder
(``TMPDIR``), read back one batch at a time.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

SPILL_FILE = "factors.spill"


class Spill:
    """Appends arrays to ``folder / SPILL_FILE`` and returns tensors that read them back."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._path = self.folder / SPILL_FILE
        self._path.touch()
        self._offset = 0
        self._lock = threading.Lock()

    def store(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        """Writes ``array`` and returns an external tensor of the same dtype, shape and name."""
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        data = tensor.tobytes()
        with self._lock, open(self._path, "ab") as file:
            offset = self._offset
            file.write(data)
            self._offset += len(data)
        return ir.ExternalTensor(
            SPILL_FILE,
            offset,
            len(data),
            tensor.dtype,
            shape=tensor.shape,
            name=name,
            base_dir=self.folder,
        )


class OutputStore(Sequence[dict[str, np.ndarray]]):
    """A sequence of batches (``{name: array}``), each written to disk when appended and read
    back whole when indexed (memory-mapped with ``mmap``); the folder goes with the store (or at
    exit)."""

    def __init__(self, prefix: str = "lrcompile-outputs-", *, mmap: bool = False) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self._mmap = "r" if mmap else None  # read-only views, paged in as they are read
        self._names: list[list[str]] = []
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def append(self, outputs: Mapping[str, np.ndarray]) -> int:
        """Writes one batch; returns its index."""
        index = len(self._names)
        for position, value in enumerate(outputs.values()):
            np.save(self.folder / f"{index}_{position}.npy", np.asarray(value))
        self._names.append(list(outputs))
        return index

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a lazy view: its batches are read when indexed too
            return _Batches(self, range(len(self))[index])
        index = range(len(self))[index]
        return {
            name: np.load(self.folder / f"{index}_{position}.npy", mmap_mode=self._mmap)
            for position, name in enumerate(self._names[index])
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[index] for index in range(len(self)))

    def close(self) -> None:
        """Removes the files now."""
        self._cleanup()


class _Batches(Sequence[dict[str, np.ndarray]]):
    """Some of an ``OutputStore``'s batches, read back when indexed."""

    def __init__(self, store: OutputStore, indices: range) -> None:
        self._store, self._indices = store, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _Batches(self._store, self._indices[index])
        return self._store[self._indices[index]]
