"""Exports all-MiniLM-L6-v2 (offline) and tokenizes the demo corpora, for running each step by hand.

python examples/minilm/prepare.py out/     # -> out/minilm.onnx, out/calib.npz, out/heldout.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrcompile.demo.minilm import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, nargs="?", default=Path("minilm-demo"))
    prepared = prepare(parser.parse_args().workdir)
    print(f"wrote {prepared.model}, {prepared.calib}, {prepared.heldout}")


if __name__ == "__main__":
    main()
