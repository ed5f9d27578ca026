"""Tiny random-weight models for the tests, as fedpeft model factories.

Each function returns a `fedpeft.models.backbone.Backbone` built from a config (no download). Called
with no arguments they are seed 0, so a run names them like any model:
`--model_name tiny_models:tiny_bert` (encoder), `tiny_models:tiny_deberta`, `tiny_models:tiny_llama` and
`tiny_models:tiny_gpt2` (decoders). conftest.py puts this folder on `sys.path` and on `PYTHONPATH`, so
the subprocesses of the Flower tests (Ray workers, SuperLink and SuperNodes) import them too.
"""

from __future__ import annotations

from fedpeft.models.backbone import Backbone
from tiny_tokenizer import byte_tokenizer, tiny_tokenizer


def tiny_bert(seed: int = 0, *, hidden: int = 16, layers: int = 2, vocab: int = 200) -> Backbone:
    """A random-weight BERT built from a config, with a word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=128)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name="tiny-bert", model=model, tokenizer=tiny_tokenizer(vocab), model_type="bert",
                    hidden_size=hidden, num_layers=layers)


def tiny_deberta(seed: int = 0, *, hidden: int = 32, layers: int = 4, vocab: int = 200) -> Backbone:
    """A random-weight DeBERTa-v3-style encoder (relative attention, p2c + c2p, no absolute positions)
    built from a config, with the word-level test tokenizer."""
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(seed)
    cfg = DebertaV2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=128,
                          relative_attention=True, position_buckets=16, norm_rel_ebd="layer_norm",
                          pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
                          share_att_key=True, type_vocab_size=0)
    model = DebertaV2Model(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name="tiny-deberta", model=model, tokenizer=tiny_tokenizer(vocab), model_type="deberta-v2",
                    hidden_size=hidden, num_layers=layers)


def tiny_llama(seed: int = 0, *, hidden: int = 16, layers: int = 2) -> Backbone:
    """A random-weight Llama (2 layers, hidden 16) with a byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                      max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name="tiny-llama", model=model, tokenizer=tokenizer, model_type="llama",
                    hidden_size=hidden, num_layers=layers, kind="causal")


def tiny_gpt2(seed: int = 0, *, hidden: int = 32, layers: int = 4, heads: int = 2) -> Backbone:
    """A random-weight GPT-2 (4 layers, hidden 32, 2 heads, tied LM head) with the byte-level
    tokenizer (GPT-2's own weights and vocabulary are not available offline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=len(tokenizer), n_positions=512,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name="tiny-gpt2", model=model, tokenizer=tokenizer, model_type="gpt2",
                    hidden_size=hidden, num_layers=layers, kind="causal")
