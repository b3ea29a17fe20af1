"""The files an LM runtime reads beside the model, copied beside a compiled model in another folder.

    genai/model.onnx + genai_config.json, tokenizer.json, ...   (onnxruntime-genai's builder)
    optimum/model.onnx + config.json, generation_config.json    (Optimum's export)
      -> out/model.lr.onnx + the same files, genai_config.json naming model.lr.onnx

so that ``og.Model("out")`` and ``ORTModelForCausalLM.from_pretrained("out")`` load the compiled
model as they loaded the original. Files already in the output folder are never overwritten, and
nothing is copied when the output shares the input's folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from lrcompile.io.model import staging_folder, write_errors

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# What onnxruntime-genai, Optimum and their tokenizers read beside the model.
RUNTIME_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
)  # fmt: skip


def copy_beside(input_path: Path, output_path: Path) -> tuple[str, ...]:
    """Copies the runtime's files from ``input_path``'s folder to ``output_path``'s, with
    ``genai_config.json``'s decoder naming the output; the names of the files written."""
    source, target = input_path.parent, output_path.parent
    if not (source / GENAI_CONFIG).is_file() and not (source / "config.json").is_file():
        return ()  # no runtime's folder
    if source.resolve() == target.resolve():
        _warn_if_named_elsewhere(source, output_path)
        return ()
    written = []
    with write_errors(output_path), staging_folder(target) as staging:
        for name in (GENAI_CONFIG, *RUNTIME_FILES):
            if not (source / name).is_file() or (target / name).exists():
                continue
            shutil.copyfile(source / name, staging / name)
            if name == GENAI_CONFIG:
                _rename_decoder(staging / name, output_path.name)
            os.replace(staging / name, target / name)
            written.append(name)
    return tuple(written)


def _rename_decoder(config_path: Path, filename: str) -> None:
    """Points ``genai_config.json``'s decoder at ``filename`` (left as it is, with a warning,
    when it has no decoder filename to point)."""
    try:
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["filename"] = filename
    except (ValueError, KeyError, TypeError) as e:
        logger.warning("%s: copied as it is, no decoder filename set (%s)", config_path.name, e)
        return
    config_path.write_text(json.dumps(config, indent=4) + "\n")


def _warn_if_named_elsewhere(folder: Path, output_path: Path) -> None:
    try:
        named = json.loads((folder / GENAI_CONFIG).read_text())["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if named != output_path.name:
        logger.warning(
            "%s names %s, not %s: onnxruntime-genai loads the original; write the compiled model"
            " to another folder (the runtime's files are copied there) or edit its filename",
            folder / GENAI_CONFIG, named, output_path.name,
        )  # fmt: skip
