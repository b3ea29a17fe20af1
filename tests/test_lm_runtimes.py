"""LMs as their runtimes build and run them: compiled, then generating through the runtime.

A tiny Qwen2 (``tests/tiny_lm.py``) is exported by onnxruntime-genai's builder (fused q/k/v,
``GroupQueryAttention``, a symbolic head size) and by Optimum (``past_key_values.*``), compiled
with ``--rank auto`` and ``--quantize int4 --rank auto``, and generated greedily with the KV cache:
through ``onnxruntime_genai`` here, through ``ORTModelForCausalLM`` under
``$LRCOMPILE_OPTIMUM_PYTHON`` (optimum-onnx needs transformers < 4.58, the builder >= 5; ``.ci/run``
makes that second environment). Both dense exports generate the same 20 tokens: the weights are the
same in either transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lrcompile
from tests import tiny_lm

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 99, 300, 7, 42, 100, 3, 8, 11]
# How each compile is asked for (under --metric kl), and how many of the 20 greedy tokens must
# equal the dense model's. Measured 2026-12-07: 20 of 20 after --rank auto; 17 of 20 after int4
# on both exports (the verdict's held-out top-1 changed on 3.1% of positions: this random model's
# logits are nearly flat, and greedy text keeps a changed token). 20 of 20 had been measured for
# int4 while auto could still give a correction as large as its weight (fixed in f11c695).
# Broken cache or past handling gives text unlike the dense model's; the exact check is cache
# == recompute.
COMPILES = {
    "rank": ({"rank": "auto", "tolerance": 0.01}, 18),
    "int4": ({"quantize": "int4", "rank": "auto", "tolerance": 0.02}, 16),
}


def _prompts(folder: Path, names: tuple[str, ...]) -> tuple[Path, Path]:
    """Prompt-only calibration and held-out data: random ids, no past."""
    ids = np.random.default_rng(0).integers(2, tiny_lm.VOCAB, (48, 16), dtype=np.int64)
    arrays = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.broadcast_to(np.arange(16), ids.shape).copy(),
    }
    for name, rows in (("calib", slice(0, 32)), ("heldout", slice(32, 48))):
        np.savez(folder / f"{name}.npz", **{n: arrays[n][rows] for n in names})
    return folder / "calib.npz", folder / "heldout.npz"


def _compiled(model: Path, out: Path, how: str, runtime_files: tuple[str, ...]):
    """``model`` compiled into the folder ``out``: lrcompile copies the runtime's files."""
    out.mkdir()
    calib, heldout = model.with_name("calib.npz"), model.with_name("heldout.npz")
    options, _ = COMPILES[how]
    result = lrcompile.compile_model(
        model, out / "model.onnx", calib=str(calib), verify_data=heldout, metric="kl", **options
    )
    assert sorted(result.runtime_files) == sorted(runtime_files)
    return result


def _agree(tokens: list[int], reference: list[int]) -> int:
    return sum(a == b for a, b in zip(tokens, reference, strict=True))


# onnxruntime-genai: its builder's model, generated with og.Generator.


@pytest.fixture(scope="module")
def genai_lm(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime_genai", reason="needs the genai extra")
    pytest.importorskip("transformers", minversion="5", reason="the genai builder needs >= 5")
    folder = tmp_path_factory.mktemp("genai")
    hf = tiny_lm.build_qwen2(folder / "hf")
    model = tiny_lm.genai_export(hf, folder / "model")
    _prompts(model.parent, ("input_ids", "attention_mask"))
    return model


def _og_generate(folder: Path) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + tiny_lm.NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(PROMPT) :]


def _recomputed(path: Path, new: list[int]) -> list[int]:
    """The greedy tokens the model predicts for the whole sequence at once, past empty."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[*PROMPT, *new[:-1]]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros((1, 2, 0, 16), np.float32)  # 2 KV heads of 16
    logits = session.run(["logits"], feeds)[0]
    return logits[0, len(PROMPT) - 1 :].argmax(-1).tolist()


@pytest.mark.parametrize("how", COMPILES)
def test_a_genai_builder_model_compiles_and_generates_with_its_cache(genai_lm, how, tmp_path):
    files = ("genai_config.json", "tokenizer.json", "tokenizer_config.json")
    result = _compiled(genai_lm, tmp_path / "out", how, files)
    assert result.output_path is not None and result.passed
    qkv = [layer for layer in result.layers if "qkv_proj" in layer.nodes[0]]
    assert len(qkv) == 2 and all(layer.fused == "q/k/v" for layer in qkv)
    dense, compiled = _og_generate(genai_lm.parent), _og_generate(tmp_path / "out")
    assert _recomputed(genai_lm, dense) == dense
    assert _recomputed(result.output_path, compiled) == compiled  # the cache path = recomputing
    assert _agree(compiled, dense) >= COMPILES[how][1], (compiled, dense)


# Optimum: its export, generated with ORTModelForCausalLM in the environment that has it.


@pytest.fixture(scope="module")
def optimum_lm(tmp_path_factory) -> tuple[str, Path]:
    python = os.environ.get("LRCOMPILE_OPTIMUM_PYTHON")
    if not python:
        pytest.skip("set LRCOMPILE_OPTIMUM_PYTHON to a Python with optimum-onnx (.ci/run does)")
    folder = tmp_path_factory.mktemp("optimum")
    script = str(Path(tiny_lm.__file__))
    build = "import sys; sys.path.insert(0, sys.argv[1]); import tiny_lm, pathlib;"
    build += " tiny_lm.build_qwen2(pathlib.Path(sys.argv[2]))"
    subprocess.run([python, "-c", build, str(Path(script).parent), str(folder / "hf")], check=True)
    export = [python, script, "optimum-export", str(folder / "hf"), str(folder / "model")]
    subprocess.run(export, check=True, capture_output=True)
    model = folder / "model" / "model.onnx"
    _prompts(model.parent, ("input_ids", "attention_mask", "position_ids"))
    return python, model


@pytest.mark.parametrize("how", COMPILES)
def test_an_optimum_export_compiles_and_generates_with_its_cache(optimum_lm, how, tmp_path):
    python, model = optimum_lm
    result = _compiled(model, tmp_path / "out", how, ("config.json", "generation_config.json"))
    assert result.output_path is not None and result.passed
    generate = [python, tiny_lm.__file__, "optimum-generate", str(model.parent)]
    generate += [str(tmp_path / "out"), json.dumps(PROMPT)]
    done = subprocess.run(generate, check=True, capture_output=True, text=True)
    tokens = json.loads(done.stdout.splitlines()[-1])
    dense, compiled = tokens["dense"], tokens["compiled"]
    assert dense["cached"] == dense["recomputed"]
    assert compiled["cached"] == compiled["recomputed"]  # the cache path = recomputing
    assert len(dense["cached"]) == tiny_lm.NEW_TOKENS
    assert _agree(compiled["cached"], dense["cached"]) >= COMPILES[how][1]


def test_the_generation_example_runs_the_compiled_model_beside_the_dense_one(genai_lm, tmp_path):
    _compiled(genai_lm, tmp_path / "int4", "int4", ("genai_config.json", "tokenizer.json",
                                                   "tokenizer_config.json"))  # fmt: skip
    script = Path(__file__).parents[1] / "examples" / "llm" / "generate.py"
    command = [sys.executable, str(script), str(genai_lm.parent), str(tmp_path / "int4")]
    command += ["--prompts", str(genai_lm.with_name("heldout.npz")), "--count", "2"]
    command += ["--prompt-tokens", "8", "--new-tokens", "8"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["model", "int4"]
    assert rows[0][4:6] == ["16/16", "8/8"]  # the reference against itself
    assert float(rows[1][1]) < float(rows[0][1])  # weights MB
