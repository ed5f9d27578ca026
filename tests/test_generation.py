"""Generation: batched greedy equals a step-by-step reference, beams batched equal unbatched, the KV
cache changes nothing (also through FedLEASE's mixture layers), and the fallback scores."""

import copy

import pytest
import torch

from fedpeft.data.batching import encode_generation, prompt_batches
from fedpeft.data.tasks import GenExample
from fedpeft.generation import (GenerationSettings, fallback_metrics, generate, generate_ids, score_generation,
                                token_f1)
from fedpeft.models.adapters import inject_lora, lora_sites
from fedpeft.models.causal_model import CausalLM

PROMPTS = ["copy: red cat =>", "a =>", "reverse: sun moon tree =>", "sky sea", "dog"]


@pytest.fixture(scope="module")
def backbone():
    from tiny_models import tiny_llama

    return tiny_llama(seed=1, hidden=32)


def _lora_model(backbone, seed=0):
    """The tiny Llama with LoRA on q/v and non-zero B, so the adapters take part."""
    peft = inject_lora(copy.deepcopy(backbone.model), rank=2, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in lora_sites(peft):
            b = site.lora.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
    return CausalLM(peft.eval(), backbone.tokenizer, backbone.hidden_size)


def _moe_model(backbone, m=3):
    from fedpeft.models.moe.layer import inject_moe_lora, moe_layers

    lm = copy.deepcopy(backbone.model)
    inject_moe_lora(lm, ["q_proj", "v_proj"], num_experts=m, own_expert=1, rank=2, lora_alpha=8, lora_dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in moe_layers(lm):
            for p in list(layer.lora_B) + [layer.router.weight]:
                p.copy_(torch.randn(p.shape, generator=gen))
    return CausalLM(lm.eval(), backbone.tokenizer, backbone.hidden_size)


def _data(tok, prompts=PROMPTS):
    return encode_generation([GenExample(p, " x", ("x",)) for p in prompts], tok, max_length=64)


def _reference_greedy(model, prompt_ids, max_new, eos):
    """Argmax of a full forward over the whole sequence, one token at a time: no cache, no padding."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new):
        x = torch.tensor([ids])
        nxt = int(model.full_logits(x, torch.ones_like(x))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.mark.parametrize("which", ["lora", "moe"])
def test_batched_greedy_equals_step_by_step_reference(backbone, which):
    model = _lora_model(backbone) if which == "lora" else _moe_model(backbone)
    data = _data(backbone.tokenizer)
    settings = GenerationSettings(max_new_tokens=8, batch_size=8)
    got = {}
    for idx, batch in prompt_batches(data, settings.batch_size):
        for i, ids in zip(idx, generate_ids(model, batch["input_ids"], batch["attention_mask"], settings)):
            got[int(i)] = ids
    for i in range(len(data)):
        assert got[i] == _reference_greedy(model, data.prompt(i), 8, backbone.tokenizer.eos_token_id), i


@pytest.mark.parametrize("which", ["lora", "moe"])
def test_kv_cache_changes_nothing(backbone, which):
    model = _lora_model(backbone) if which == "lora" else _moe_model(backbone)
    data = _data(backbone.tokenizer)
    for beams in (1, 3):
        with_cache = generate(model, data, GenerationSettings(num_beams=beams, max_new_tokens=8, batch_size=5))
        without = generate(model, data, GenerationSettings(num_beams=beams, max_new_tokens=8, batch_size=5,
                                                           use_cache=False))
        assert with_cache == without


def test_beam_search_batched_equals_unbatched(backbone):
    model = _lora_model(backbone, seed=2)
    data = _data(backbone.tokenizer)
    s = dict(num_beams=3, max_new_tokens=8, length_penalty=0.8, no_repeat_ngram_size=2)
    batched = generate(model, data, GenerationSettings(batch_size=5, **s))
    single = generate(model, data, GenerationSettings(batch_size=1, **s))
    assert batched == single
    assert any(batched)  # something was generated


def test_no_repeat_ngram_size_is_honoured(backbone):
    model = _lora_model(backbone, seed=4)
    tok = backbone.tokenizer
    data = _data(tok)
    settings = GenerationSettings(max_new_tokens=12, no_repeat_ngram_size=1, batch_size=5)
    for idx, batch in prompt_batches(data, 5):
        for i, new in zip(idx, generate_ids(model, batch["input_ids"], batch["attention_mask"], settings)):
            seq = list(data.prompt(i)) + new
            assert not set(new) & set(data.prompt(i)) and len(set(new)) == len(new)  # n = 1: no token twice
            assert len(seq) == len(data.prompt(i)) + len(new)


def test_only_new_tokens_are_decoded_and_cut_at_eos(backbone):
    tok = backbone.tokenizer
    eos = tok.eos_token_id
    a, b = tok("hi", add_special_tokens=False)["input_ids"], tok("yo", add_special_tokens=False)["input_ids"]

    class FakeLM:
        device = torch.device("cpu")  # a transformers model's property: where its weights are

        def eval(self):
            return self

        def generate(self, input_ids, attention_mask, generation_config):
            rows = [input_ids[0].tolist() + a + [eos] + b, input_ids[1].tolist() + b + [tok.pad_token_id] * 3]
            return torch.tensor(rows)

    class Fake:
        lm, tokenizer = FakeLM(), tok

    ids = torch.tensor([[5, 6, 7], [tok.pad_token_id, 8, 9]])
    out = generate_ids(Fake(), ids, torch.tensor([[1, 1, 1], [0, 1, 1]]), GenerationSettings())
    assert out[0] == a
    assert tok.decode(out[1], skip_special_tokens=True) == "yo"


# ------------------------------------------------------------------ scoring
def test_token_f1_and_exact_match_against_hand_values():
    assert token_f1("the cat sat", "The cat sat.") == 1.0
    assert token_f1("cat sat on mat", "the cat sat") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0
    m = fallback_metrics(["the cat", "dog"], [("a dog", "The cat!"), ("cat",)])
    assert m == {"token_f1": pytest.approx(0.5), "exact_match": pytest.approx(0.5)}
    with pytest.raises(ValueError):
        fallback_metrics(["a"], [])


def test_score_generation_uses_the_registered_metrics_when_known(monkeypatch):
    from decoder_helpers import gen_spec

    from fedpeft import metrics
    from fedpeft.data import tasks

    monkeypatch.setitem(tasks.TASKS, "tiny-copy", gen_spec("tiny-copy"))
    assert set(score_generation("tiny-copy", ["a b"], [("a b",)])) == {"token_f1", "exact_match"}
    seen = []
    monkeypatch.setattr(metrics, "METRIC_NAMES", metrics.METRIC_NAMES + ("bleu",))
    monkeypatch.setattr(metrics, "compute_metrics", lambda t, h, r: seen.append((t, h, r)) or {"bleu": 1.0})
    spec = gen_spec("tiny-bleu")
    monkeypatch.setitem(tasks.TASKS, "tiny-bleu", type(spec)(**{**vars(spec), "metrics": ("bleu",),
                                                                   "primary_metric": "bleu"}))
    assert score_generation("tiny-bleu", ["a b"], [("a b", "c")]) == {"bleu": 1.0}
    assert seen == [("tiny-bleu", ["a b"], [["a b", "c"]])]


def test_undeclared_metrics_fall_back_with_a_warning(monkeypatch, caplog):
    from decoder_helpers import gen_spec

    from fedpeft.data import tasks

    spec = gen_spec("tiny-spice")
    monkeypatch.setitem(tasks.TASKS, "tiny-spice", type(spec)(**{**vars(spec), "metrics": ("spice",),
                                                                     "primary_metric": "spice"}))
    import logging

    monkeypatch.setattr(logging.getLogger("fedpeft"), "propagate", True)  # a run's setup_logging turns it off
    with caplog.at_level("WARNING", logger="fedpeft"):
        out = score_generation("tiny-spice", ["a"], [("a",)])
    assert out == {"token_f1": 1.0, "exact_match": 1.0}
    assert "does not implement" in caplog.text
