"""A tiny Qwen2 built in code, exported the ways LM runtimes load it, and generated with them.

    build_qwen2(folder)              -> a transformers checkpoint (2 layers, d 64, GQA 4/2 heads)
    genai_export(hf, out)            -> onnxruntime-genai's builder, fp32 CPU (GroupQueryAttention)
    python tests/tiny_lm.py optimum-export HF OUT
    python tests/tiny_lm.py optimum-generate DENSE COMPILED PROMPT_JSON  -> JSON on stdout

The Optimum commands run under a Python with optimum-onnx (``$LRCOMPILE_OPTIMUM_PYTHON``, which
``.ci/run`` makes): optimum-onnx 0.1 needs transformers < 4.58, the genai builder >= 5, so one
environment cannot hold both. Only torch and transformers are imported here, so the checkpoint is
the same in either environment.

Every weight matrix is low rank (8) plus 1% noise, as trained weights are close to: low rank or
an int4 correction then keep the model's greedy tokens, which random weights would not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VOCAB = 512
NEW_TOKENS = 20


def build_qwen2(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out, inp = module.weight.shape
                left = torch.randn(out, 8, generator=generator)
                right = torch.randn(8, inp, generator=generator)
                weight = left @ right / (8 * inp) ** 0.5
                noise = torch.randn(out, inp, generator=generator) * weight.std() * 0.01
                module.weight.copy_(weight + noise)
    model.generation_config.eos_token_id = None  # generate every requested token
    model.save_pretrained(folder)
    return folder


def genai_export(hf: Path, out: Path) -> Path:
    """onnxruntime-genai's model builder, fp32 for the CPU, as its users run it."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf)]
    command += ["-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")]
    subprocess.run(command, check=True, capture_output=True)
    return out / "model.onnx"


def _optimum_export(hf: str, out: str) -> None:
    from optimum.exporters.onnx import main_export

    main_export(hf, out, task="text-generation-with-past", no_post_process=False)


def _optimum_generate(dense: str, compiled: str, prompt_json: str) -> None:
    """Greedy tokens through ``ORTModelForCausalLM`` with the cache, and the tokens that
    recomputing the whole sequence without a cache predicts at the same positions."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    prompt = torch.tensor([json.loads(prompt_json)], dtype=torch.int64)
    result = {}
    for name, folder in (("dense", dense), ("compiled", compiled)):
        model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
        tokens = model.generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        new = tokens[0, prompt.shape[1] :].tolist()
        logits = model(input_ids=tokens[:, :-1], attention_mask=torch.ones_like(tokens[:, :-1]))
        recomputed = logits.logits[0, prompt.shape[1] - 1 :].argmax(-1).tolist()
        result[name] = {"cached": new, "recomputed": recomputed}
    print(json.dumps(result))


if __name__ == "__main__":
    commands = {"optimum-export": _optimum_export, "optimum-generate": _optimum_generate}
    commands[sys.argv[1]](*sys.argv[2:])
