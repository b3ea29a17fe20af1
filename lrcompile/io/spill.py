"""A scratch file for factors, so that compiling a large model holds few weights in memory.

The factorize pass hands each layer's factors to ``Spill.store`` as soon as they exist: their
bytes are appended to one file and the pass keeps an ``onnx_ir.ExternalTensor`` pointing at them.
Saving then copies file to file (``copy_file_range``), never the whole model through memory.
The folder is the output's staging folder; it is removed with it.
"""

from __future__ import annotations

import threading
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
