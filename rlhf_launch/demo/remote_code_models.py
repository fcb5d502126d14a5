"""Build tiny, offline models that carry their own Python code, as InternLM2's do.

    python -m rlhf_launch.demo.remote_code_models [--out DIR] [--force]

The models are of a model type of their own, ``tiny_remote`` (rlhf_launch/demo/remote_code/: Llama's modules
under another name), which transformers does not know: each folder's config.json names its classes in
``auto_map`` and the folder holds their code, so that loading needs ``trust_remote_code``. Their weights are
the tiny models' (rlhf_launch/demo/tiny_models.py, built first if needed), so they compute exactly what those do.
DIR (default ``build/tiny_remote`` in the repository) receives:

- ``tiny_remote_causal/``: a causal LM (the tiny actor's weights); ``auto_map`` maps AutoModel and
  AutoModelForCausalLM to its ``TinyRemoteForCausalLM``, as InternLM2 chat models do. Its tokenizer is a class of
  its own too (``tokenization_tiny_remote.py``, the tiny tokenizer under another name), so it needs
  ``tokenizer_config.trust_remote_code``;
- ``tiny_remote_reward/``: a reward model that is its own class, ``TinyRemoteForRewardModel`` (AutoModel in
  ``auto_map``): the decoder and a one-output ``v_head``, not a sequence classifier, as InternLM2's reward models;
  the tiny reward model's weights (its ``score`` saved as ``v_head``), with the plain tiny tokenizer;
- ``.complete``: the stamp (the recipe's hash, which covers the tiny models' own stamp and the code files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from rlhf_launch.demo import tiny_models
from rlhf_launch.demo.staged_dir import STAMP_NAME, build_once, command_line

RECIPE_VERSION = "tiny-remote-1"
DEFAULT_OUT_DIR = tiny_models.REPO_ROOT / "build" / "tiny_remote"
CODE_DIR = Path(__file__).resolve().parent / "remote_code"
MODEL_TYPE = "tiny_remote"
CONFIG_CODE = "configuration_tiny_remote.TinyRemoteConfig"
MODEL_CODE = "modeling_tiny_remote"
CAUSAL, REWARD = "tiny_remote_causal", "tiny_remote_reward"
# The folder of each model: (tiny model it takes its weights from, its class, auto_map beyond AutoConfig, renamed tensors)
MODELS = {
    CAUSAL: ("actor", "TinyRemoteForCausalLM", ("AutoModel", "AutoModelForCausalLM"), {}),
    REWARD: ("reward", "TinyRemoteForRewardModel", ("AutoModel",), {"score.weight": "v_head.weight"}),
}
TOKENIZER_CLASS = "TinyRemoteTokenizer"
TOKENIZER_CODE = "tokenization_tiny_remote"
# The files a model folder keeps from its tiny model: the tokenizer's and the generation defaults.
KEPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def code_files() -> list[Path]:
    """The code files the models carry (rlhf_launch/demo/remote_code/), in a fixed order."""
    return sorted(p for p in CODE_DIR.glob("*.py") if p.name != "__init__.py")


def recipe(tiny_stamp: str) -> dict:
    """Everything that determines the build, given the stamp of the tiny models it starts from."""
    return {
        "version": RECIPE_VERSION,
        "tiny_models": tiny_stamp,
        "models": {name: [source, cls, list(auto), renamed] for name, (source, cls, auto, renamed) in MODELS.items()},
        "code": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in code_files()},
    }


def _remote_config(source: Path, cls: str, auto: tuple[str, ...]) -> dict:
    config = json.loads((source / "config.json").read_text())
    for key in ("id2label", "label2id"):  # a sequence classifier's labels: this class has none
        config.pop(key, None)
    config.update(model_type=MODEL_TYPE, architectures=[cls],
                  auto_map={"AutoConfig": CONFIG_CODE, **{name: f"{MODEL_CODE}.{cls}" for name in auto}})
    return config


def _copy_weights(source: Path, target: Path, renamed: dict[str, str]) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(source / "model.safetensors"))
    save_file({renamed.get(k, k): v for k, v in tensors.items()}, str(target / "model.safetensors"), metadata={"format": "pt"})


def _remote_tokenizer(folder: Path) -> None:
    """Make the folder's tokenizer a class of its own, named in tokenizer_config.json's auto_map."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class=TOKENIZER_CLASS, auto_map={"AutoTokenizer": [None, f"{TOKENIZER_CODE}.{TOKENIZER_CLASS}"]})
    path.write_text(json.dumps(config, indent=2) + "\n")


def _build_into(directory: Path, tiny: Path) -> None:
    for name, (source_name, cls, auto, renamed) in MODELS.items():
        source, target = tiny / source_name, directory / name
        target.mkdir()
        for kept in KEPT_FILES:
            if (source / kept).is_file():
                shutil.copy2(source / kept, target / kept)
        for code in code_files():
            if code.stem != TOKENIZER_CODE or name == CAUSAL:
                shutil.copy2(code, target / code.name)
        (target / "config.json").write_text(json.dumps(_remote_config(source, cls, auto), indent=2) + "\n")
        _copy_weights(source, target, renamed)
        if name == CAUSAL:
            _remote_tokenizer(target)
        print(f"[remote_code_models] {name}: {cls} with its code ({', '.join(sorted(p.name for p in target.glob('*.py')))})",
              flush=True)


def build(out_dir: Path = DEFAULT_OUT_DIR, force: bool = False, tiny_dir: Path = tiny_models.DEFAULT_OUT_DIR) -> Path:
    """Build the remote-code models into ``out_dir`` (and the tiny models into ``tiny_dir`` first, if needed),
    unless its stamp already matches the recipe."""
    tiny = tiny_models.build(tiny_dir)
    stamp = hashlib.sha256(json.dumps(recipe((tiny / STAMP_NAME).read_text().strip()), sort_keys=True).encode()).hexdigest()
    return build_once(out_dir, stamp, lambda staging: _build_into(staging, tiny), "remote_code_models", force)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--out DIR`` and ``--force``; returns the exit status."""
    return command_line(build, DEFAULT_OUT_DIR, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
