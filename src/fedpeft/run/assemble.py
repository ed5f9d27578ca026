"""One way to build a run, for every entry point (CLI, bench, Flower ServerApp and ClientApp, export).

A run is assembled in the same steps wherever it starts:
  1. settings: the saved config.json when resuming, resolved once (`RunConfig.resolved`);
  2. the backbone of the kind the tasks need (an encoder, or a decoder for generation tasks);
  3. the algorithm from the method catalogue, its runtime built on that backbone;
  4. the federation: the clients' data (where the data is) or what the server knows of them;
  5. the run folder, its log and history.

A run folder belongs to one process at a time: the process that opens it (`open_run_dir`, or
`saved_config` for `--resume`) takes `.fedpeft.lock` there (an flock through the `filelock`
package, freed by the kernel if the process dies, so a killed run never leaves a stale lock) and
keeps it for the run's lifetime (`release_run_dir`). A new run never writes into a folder that holds
another one unless `--overwrite` says so; `--resume` keeps the settings that shape the run and
applies, or refuses by name, the flags given with it.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from pathlib import Path

from fedpeft.config import DECODER_PATH_BEFORE_THE_SETTING, ENCODER_PATH_BEFORE_THE_SETTING, RunConfig, read_settings
from fedpeft.data.tasks import is_generation_run
from fedpeft.errors import FedPeftError

log = logging.getLogger("fedpeft")

LOCK = ".fedpeft.lock"
RUN_FILES = ("config.json", "training_history.json", "checkpoint.pt")  # a folder with one of these holds a run
_HELD: dict[str, object] = {}  # resolved run folder → the FileLock this process holds on it


# ------------------------------------------------------------ the run folder's lock
def lock_run_dir(run_dir: Path) -> None:
    """Take the run folder's lock for this process, or say which folder is busy. Taking it again
    in the process that holds it is a no-op (a bench holds it around the run it starts)."""
    from filelock import FileLock, Timeout

    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    lock = FileLock(str(Path(run_dir) / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FedPeftError(f"{run_dir} is in use by another fedpeft process (it holds {run_dir / LOCK}): wait "
                           "for that run to end, or choose another folder") from None
    except OSError as exc:
        raise FedPeftError(f"cannot lock the run folder {run_dir}: {exc.strerror or exc}") from None
    _HELD[key] = lock


def release_run_dir(run_dir: Path | str | None) -> None:
    """Free the run folder's lock if this process holds it (the lock file stays: deleting it could
    let two processes lock two different files of the same name)."""
    if run_dir is None:
        return
    lock = _HELD.pop(str(Path(run_dir).resolve()), None)
    if lock is not None:
        lock.release()


# ------------------------------------------------------------ steps 1–3
def settings_before_they_existed(settings: dict) -> dict[str, str]:
    """What a run folder's config.json (`settings`) lacks because it was saved before these settings
    existed, with the value that run used: the padded encoder path, and the padded decoder path for a
    decoder (generation) run. Resuming a run and the bench's reuse check both read a folder through it."""
    missing = {}
    if "encoder_path" not in settings:
        missing["encoder_path"] = ENCODER_PATH_BEFORE_THE_SETTING
    if "decoder_path" not in settings and is_generation_run(settings):
        missing["decoder_path"] = DECODER_PATH_BEFORE_THE_SETTING
    return missing


def saved_config(cfg: RunConfig) -> RunConfig:
    """`cfg` itself, or for `--resume DIR` the settings DIR was run with (its config.json), with
    the flags `cfg` asks for applied when they may change on resume (`RunConfig.resume_kind`).
    Everything that can refuse a resume is checked here, before any work: DIR is a run folder no
    other process holds, its config.json, history and checkpoint are readable, the checkpoint's
    fingerprint matches config.json, and no flag asks to change a setting that shapes the run."""
    if cfg.resume is None:
        return cfg
    run_dir = Path(cfg.resume)
    if not run_dir.is_dir():
        raise FedPeftError(f"cannot resume: {run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}")
    path = run_dir / "config.json"
    if path.is_dir():
        raise FedPeftError(f"cannot resume: {path} is a folder, so {run_dir} is not a fedpeft run folder")
    if not path.is_file():
        raise FedPeftError(f"cannot resume: {run_dir} is not a fedpeft run folder (no config.json); to start a run "
                           f"there, use --output_dir {run_dir}")
    lock_run_dir(run_dir)
    try:
        saved = RunConfig.load(path)
        for name, value in settings_before_they_existed(read_settings(path)).items():  # it goes on as it ran
            setattr(saved, name, value)
        _check_resumable(run_dir, saved)
        changes = _apply_resume_flags(run_dir, saved, cfg)
    except BaseException:
        release_run_dir(run_dir)
        raise
    saved.resume = cfg.resume
    if changes:
        from fedpeft.records.history import setup_logging

        setup_logging(run_dir, saved.quiet)  # said on the console and in the run's own log
        log.warning("resuming %s with %s", run_dir, "; ".join(changes))
    return saved


def _check_resumable(run_dir: Path, saved: RunConfig) -> None:
    """The checkpoint and the history are readable and agree with config.json."""
    from fedpeft.config import _flag
    from fedpeft.records.checkpoint import checkpoint_round, fingerprint
    from fedpeft.records.history import HISTORY, read_history

    ckpt = checkpoint_round(run_dir)
    if ckpt is None:
        if (run_dir / HISTORY).exists():
            read_history(run_dir)  # damaged: say so now, not after loading the model
        return
    rnd, saved_print = ckpt
    if not (run_dir / HISTORY).exists():
        rounds = f"rounds 1..{rnd}" if rnd > 1 else "round 1"
        raise FedPeftError(f"cannot resume: {run_dir} has a checkpoint of round {rnd} but no {HISTORY}, so the "
                           f"records of {rounds} are gone: restore that file, or start again with --overwrite")
    read_history(run_dir)
    if saved_print is None:  # a checkpoint written before fingerprints existed
        return
    now = fingerprint(saved.shaping_settings())["settings"]
    for name, then in saved_print.get("settings", {}).items():
        if name in now and now[name] != then:
            raise FedPeftError(f"cannot resume: {run_dir}/config.json says {_flag(name)} {now[name]!r}, but the "
                               f"checkpoint was made with {then!r} (config.json was changed after the run started): "
                               f"put {then!r} back, or start a new run")


def _apply_resume_flags(run_dir: Path, saved: RunConfig, cfg: RunConfig) -> list[str]:
    """Apply to `saved` the settings `cfg` asks for that may change on resume; refuse the others by
    name. Returns what changed, as text."""
    from fedpeft.config import _flag

    changes = []
    for name, value in cfg.requested().items():
        if name == "resume":
            continue
        if name == "overwrite":
            if value:
                raise FedPeftError("--overwrite and --resume contradict each other: --resume continues the run, "
                                   "--overwrite replaces it; give one of them")
            continue
        if name == "output_dir":
            if value is not None and Path(value).resolve() != run_dir.resolve():
                raise FedPeftError(f"--output_dir {value} and --resume {run_dir} name two folders: a resumed run "
                                   "stays in its own folder; drop --output_dir")
            continue
        old = getattr(saved, name)
        if value == old or _resolves_to(saved, name, value, old):
            continue
        kind = saved.resume_kind(name)
        if kind == "grow" and value < old:
            raise FedPeftError(f"cannot resume {run_dir} with {_flag(name)} {value}: the run has {old}, and a "
                               f"resume can only raise it")
        if kind not in ("free", "grow"):
            why = (" (SLoRA's sparse stage is a fraction of all rounds)" if name == "global_rounds" else "")
            raise FedPeftError(f"cannot resume {run_dir} with {_flag(name)} {value!r}: it was run with {old!r}, and "
                               f"{_flag(name)} shapes the run{why}; start a new run (another --output_dir) to "
                               "change it")
        setattr(saved, name, value)
        changes.append(f"{_flag(name)} {value!r} (was {old!r})")
    saved.validate()
    return changes


def load_run_backbone(cfg: RunConfig, backbone=None):
    """The backbone the tasks need: an encoder, or a causal LM for generation tasks. Tests pass a
    ready one (`backbone`); it must be of the right kind."""
    from fedpeft.data.tasks import backbone_kind

    kind = backbone_kind(cfg.tasks)
    if backbone is None:
        from fedpeft.models.backbone import load_backbone

        return load_backbone(cfg.model_name, kind=kind, quantization=cfg.quantization, device=cfg.device)
    if getattr(backbone, "kind", "encoder") != kind:
        need = "a causal (decoder)" if kind == "causal" else "an encoder"
        raise FedPeftError(f"these tasks need {need} backbone, got {backbone.name!r} ({backbone.kind})")
    return backbone


def settle(cfg: RunConfig, backbone=None):
    """Steps 1–2: (resolved settings, backbone)."""
    cfg = saved_config(cfg).with_dataset()  # --dataset: its task registered, its clients in `tasks`
    if not cfg.tasks:
        cfg.check_runnable()  # no clients: say so before loading anything
    backbone = load_run_backbone(cfg, backbone)
    cfg = cfg.resolved(model_type=backbone.model_type)
    cfg.check_runnable()
    check_max_length(cfg, backbone)
    return cfg, backbone


def _resolves_to(saved: RunConfig, name: str, value, old) -> bool:
    """Does asking for `value` give the saved (resolved) `old` anyway? config.json holds resolved
    settings: LoRA targets for the architecture, the head policy a method imposes, the proxy
    dataset `auto` picks. Asking for the automatic value again is not a change."""
    if name not in ("target_modules", "head_policy", "proxy_dataset"):
        return False
    if name == "target_modules" and not value:
        return True  # the architecture's default: what config.json holds
    try:
        probe = RunConfig(**{**saved.to_dict(), name: value}).resolved()
    except FedPeftError:
        return False
    return getattr(probe, name) == old


def check_max_length(cfg: RunConfig, backbone) -> None:
    """--max-length fits the model's positions (with --max-new-tokens for generation) and holds at
    least one token of text besides the special tokens, and for label-word generation tasks the
    whole label word: a value outside that is an error, never a crash or a silent no-op."""
    from fedpeft.data.prompts import LABEL_WORDS
    from fedpeft.data.tasks import get_task
    from fedpeft.models.backbone import max_positions

    n = cfg.max_length
    limit = max_positions(backbone.model)
    causal = getattr(backbone, "kind", "encoder") == "causal"
    if limit is not None and n > limit:
        raise FedPeftError(f"--max-length {n} is more than the {limit} positions of {backbone.name}: "
                           f"use --max-length {limit} or less")
    if limit is not None and causal and n - 1 + cfg.max_new_tokens > limit:
        raise FedPeftError(f"--max-length {n} with --max-new-tokens {cfg.max_new_tokens} can make sequences of "
                           f"{n - 1 + cfg.max_new_tokens} tokens, more than the {limit} positions of {backbone.name}: "
                           "lower one of them")
    tok = backbone.tokenizer
    if causal:
        need, why = 2, "a prompt token and a target token"
        for task in dict.fromkeys(cfg.tasks):
            for word in LABEL_WORDS.get(get_task(task).name, ()):
                size = len(tok([word], add_special_tokens=False)["input_ids"][0]) + 2  # + EOS + one prompt token
                if size > need:
                    need, why = size, f"the {task} label word {word!r} with its end-of-text token and a prompt token"
    else:
        pair = any(get_task(t).is_pair for t in cfg.tasks)
        need = len(tok(["a"], ["b"] if pair else None, truncation=False)["input_ids"][0])
        why = "the special tokens and a token of text" + (" on each side of a pair" if pair else "")
    if n < need:
        raise FedPeftError(f"--max-length {n} cannot hold {why} ({need} tokens on {backbone.name}): use --max-length "
                           f"{need} or more")


def build_algorithm(cfg: RunConfig, backbone, federation=None):
    """Step 3: the algorithm with its runtime; bound to `federation` (ClientInfo list) when given.
    `cfg` is resolved against this backbone (a no-op for settings that are resolved already)."""
    from fedpeft.algorithms.registry import get_algorithm

    cfg = cfg.resolved(model_type=backbone.model_type)
    algorithm = get_algorithm(cfg)
    runtime = algorithm.place_runtime(algorithm.build_runtime(backbone))
    if federation is not None:
        algorithm.bind(runtime, federation)
    else:
        algorithm.runtime = runtime  # bound when the federation is known (Flower: after discovery)
    return algorithm


# ------------------------------------------------------------ step 5
def default_run_dir(cfg: RunConfig, root: Path = Path("runs")) -> Path:
    """A new folder runs/<method>-<time>, created here: a second run started in the same second
    (in this process or another) gets <method>-<time>-2, and so on (mkdir is atomic)."""
    base = f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in itertools.count(1):
            candidate = root / (base if i == 1 else f"{base}-{i}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as exc:
        raise FedPeftError(f"cannot create a run folder under {root}: {exc.strerror or exc}") from None
    raise AssertionError("unreachable")


def check_new_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """A new run may go into `run_dir`: it is absent, empty, or a folder without a run, or it holds
    a fedpeft run and --overwrite says to replace it. Cheap: call it before loading anything."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FedPeftError(f"--output_dir {run_dir} is a file, not a folder: choose another --output_dir")
    config = run_dir / "config.json"
    if config.is_dir():
        raise FedPeftError(f"--output_dir {run_dir}: its config.json is a folder, so no run can be saved there; "
                           "choose another --output_dir")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not held:
        return
    if not overwrite:
        raise FedPeftError(f"{run_dir} already holds a run ({held[0]}): continue it with `--resume {run_dir}`, "
                           "or replace it with `--overwrite`")
    if config.exists() and not _is_fedpeft_config(config):
        raise FedPeftError(f"{run_dir}/config.json is not a fedpeft run's settings: --overwrite empties only fedpeft "
                           "run folders; choose another --output_dir")


def _is_fedpeft_config(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"method", "tasks", "model_name"} <= set(data)


def _empty(run_dir: Path) -> None:
    """--overwrite: remove everything the old run left (its files, figures, client states, exports),
    but not the lock this process holds."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def open_run_dir(cfg: RunConfig) -> tuple[Path, bool]:
    """Create (or, for --resume, take) the run folder and its lock, save the resolved settings as
    config.json, start the log and apply the thread count: (run folder, continue from its
    checkpoint?). A resumed folder without a checkpoint yet (killed in round 1) starts again."""
    from fedpeft.atomic import remove_stale_temporaries
    from fedpeft.records.checkpoint import NAME as CHECKPOINT
    from fedpeft.records.history import setup_logging

    resume = cfg.resume is not None
    if resume:
        run_dir = Path(cfg.resume)
    elif cfg.output_dir:
        run_dir = Path(cfg.output_dir)
        check_new_run_dir(run_dir, overwrite=cfg.overwrite)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedPeftError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}") from None
    else:
        run_dir = default_run_dir(cfg)
    lock_run_dir(run_dir)
    try:
        emptied = False
        if not resume:
            check_new_run_dir(run_dir, overwrite=cfg.overwrite)  # again, under the lock
            if cfg.overwrite and any(e.name != LOCK for e in run_dir.iterdir()):
                _empty(run_dir)
                emptied = True
        remove_stale_temporaries(run_dir)  # left by a killed writer; nobody else writes here now
        to_save = RunConfig(**{**cfg.to_dict(), "resume": None, "overwrite": False, "output_dir": str(run_dir)})
        to_save.save(run_dir / "config.json")
        setup_logging(run_dir, cfg.quiet)
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
    except BaseException:
        release_run_dir(run_dir)
        raise
    if emptied:
        log.warning("--overwrite: emptied %s of the run it held", run_dir)
    cfg.overwrite = False  # done: the run from here on (and its Flower run key) is the one config.json describes
    log.info("run folder: %s", run_dir)
    from fedpeft.hardware import announce

    announce(cfg.device, cfg.precision)  # the resolved device and precision, and why (config.json has them)
    has_checkpoint = resume and (run_dir / CHECKPOINT).is_file()
    if resume and not has_checkpoint:
        log.warning("%s has no checkpoint yet (the run stopped in its first round): starting from round 1", run_dir)
    return run_dir, has_checkpoint


def abandon_new_run(run_dir: Path) -> None:
    """A new run refused before its first round (a user mistake found while loading the data or
    building the method): take back its config.json, so that the corrected command can use the same
    folder without --overwrite. Its log stays (it says what went wrong); a folder that holds a
    history or a checkpoint is never touched."""
    if any((run_dir / name).exists() for name in RUN_FILES[1:]):
        return
    (run_dir / "config.json").unlink(missing_ok=True)


def open_history(run_dir: Path, cfg: RunConfig, federation, *, resume: bool):
    from fedpeft.records.history import RunHistory

    meta = {"method": cfg.method, "model_name": cfg.model_name, "tasks": cfg.tasks, "seed": cfg.seed,
            "clients": [vars(i) for i in federation], "engine": cfg.engine}
    history = RunHistory.open(run_dir, meta, resume=resume)
    if cfg.tracking != "none":  # --tracking: every round entry and the final files go to the tracker too
        from fedpeft.records.tracking import open_tracker

        history.listeners.append(open_tracker(cfg, run_dir, resume=resume))
    return history


def bound(cfg: RunConfig, backbone=None):
    """(algorithm bound to its federation, clients): a run's parts without a run folder, as an
    engine gets them (benchmarks and tests drive the hooks by hand)."""
    from fedpeft.run.federation import prepare_clients

    cfg, backbone = settle(cfg, backbone)
    infos, clients = prepare_clients(cfg, backbone.tokenizer)
    return build_algorithm(cfg, backbone, infos), clients
