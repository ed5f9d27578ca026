"""The federation's clients, built from the run's settings: every example cut as every engine must cut
it (the same partition code and seed on a laptop and on a SuperNode), tokenized once per client."""

from __future__ import annotations

import logging

from fedpeft.algorithms.base import Client, ClientInfo
from fedpeft.config import RunConfig
from fedpeft.data.batching import encode, encode_generation
from fedpeft.data.chat import encode_chat, uses_chat_template
from fedpeft.data.partition.federation import build_federation
from fedpeft.data.partition.validation import hold_out_validation
from fedpeft.data.tasks import get_task

log = logging.getLogger("fedpeft")


def encode_client_data(task, examples, tokenizer, max_length: int, chat_template: str = "none"):
    """Token ids of one client's examples: `GenExample`s for a generation task (an instruction task
    through the tokenizer's chat template when `chat_template` is auto and it has one, data/chat.py),
    `Example`s otherwise."""
    if task.is_generation:
        if task.chat and uses_chat_template(chat_template, tokenizer):
            return encode_chat(examples, tokenizer, max_length)
        return encode_generation(examples, tokenizer, max_length)
    return encode(examples, tokenizer, max_length, regression=task.is_regression)


def federation_parts(cfg: RunConfig):
    """Every client's examples (partition.ClientData), as every engine must cut them: the server's
    reserve held out of every pool (LEFF family), the validation hold-out applied."""
    for t in cfg.tasks:
        get_task(t)  # unknown task: one clear error before any loading
    train_n, test_n = cfg.samples_for_tasks()
    parts = build_federation(cfg.tasks, train_samples=train_n, test_samples=test_n,
                             partition=cfg.partition, label_split=cfg.label_split, alpha=cfg.alpha,
                             seed=cfg.seed, data_dir=cfg.resolved_data_dir(), carve_out=cfg.carve_out,
                             reserve=cfg.reserved_train_examples, min_train=cfg.batch_size,
                             e2e_key=cfg.e2e_partition_key, test_source=cfg.test_source)
    if cfg.validation_fraction > 0:
        parts = [hold_out_validation(p, cfg.validation_fraction, cfg.seed, get_task(p.task).num_labels)
                 for p in parts]
    return parts


def make_client(cfg: RunConfig, part, tokenizer) -> Client:
    """One client from its examples, tokenized."""
    task = get_task(part.task)
    info = ClientInfo(part.client_id, part.task, task.num_labels, len(part.train))
    return Client(info, encode_client_data(task, part.train, tokenizer, cfg.max_length, cfg.chat_template),
                  encode_client_data(task, part.test, tokenizer, cfg.max_length, cfg.chat_template),
                  task.is_regression)


def prepare_clients(cfg: RunConfig, tokenizer) -> tuple[list[ClientInfo], list[Client]]:
    parts = federation_parts(cfg)
    if cfg.dataset_resolved:
        from fedpeft.data.custom import describe

        log.info("%s", describe(cfg.dataset_spec(), cfg.resolved_data_dir()))
    if cfg.validation_fraction > 0:
        log.info("scoring on a validation hold-out of %.0f%% of each client's training data, not on the test split",
                 100 * cfg.validation_fraction)
    chat = sorted({p.task for p in parts if get_task(p.task).chat})
    if chat:
        how = ("the tokenizer's chat template (a user turn, loss on the assistant's turn)"
               if uses_chat_template(cfg.chat_template, tokenizer) else
               "plain prompts" + (" (the tokenizer has no chat template)" if cfg.chat_template == "auto" else ""))
        log.info("instruction tasks %s: %s", ", ".join(chat), how)
    clients = [make_client(cfg, part, tokenizer) for part in parts]
    import sklearn.metrics  # noqa: F401  (a 1-2 s import: pay it here, not inside round 1's timing)

    log.info("federation: %d clients; %s", len(clients),
             ", ".join(f"{t} × {cfg.tasks.count(t)}" for t in dict.fromkeys(cfg.tasks)))
    return [c.info for c in clients], clients
