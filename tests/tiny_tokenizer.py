"""Tokenizers of the tiny test models (tiny_models.py), built in memory so tests need no vocabulary file:
a word-level BERT tokenizer and a byte-level one for the decoders."""

from __future__ import annotations


def tiny_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Words hash into the vocabulary, so any text tokenizes deterministically.
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return _HashingTokenizer(fast, len(specials), vocab_size)


class _HashingTokenizer:
    """Maps each word to w<k> with a stable hash before tokenizing (no OOV for tiny tests)."""

    def __init__(self, fast, n_special: int, vocab_size: int):
        self._fast = fast
        self._lo, self._n = n_special, vocab_size - n_special
        self.pad_token_id = fast.pad_token_id

    def _map(self, text: str | None) -> str | None:
        if text is None:
            return None
        import zlib

        return " ".join(f"w{self._lo + zlib.crc32(w.lower().encode()) % self._n}" for w in text.split())

    def __call__(self, text, text_pair=None, **kw):
        texts = [self._map(t) for t in text]
        pairs = None if text_pair is None else [self._map(t) for t in text_pair]
        return self._fast(texts, pairs, **kw)


def byte_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + <pad>, <s>, </s>): any text round-trips,
    for the tiny decoder of the tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
