"""`fedpeft run | demo | report | export | bench`: parse, build a RunConfig, call. Nothing else lives here.

Every RunConfig field is a flag in two spellings: `--global-rounds` and the official FedLEASE
code's `--global_rounds`. `--config run.toml` supplies defaults; flags given on the line win.
A user mistake prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fedpeft.config import DECODER_PATHS, ENCODER_PATHS, RunConfig, field_help, read_settings
from fedpeft.errors import FedPeftError, RunFailed

GROUP_TITLES = {"run": "what to run", "data": "data", "dataset": "your own data (--dataset: a file or a hub dataset)",
                "federation": "who takes part: clients, sampling, scoring",
                "training": "local training", "model": "model, LoRA and head",
                "generation": "decoders and generation", "chat": "chat models and instruction data", "fedlease": "FedLEASE",
                "leff": "LEFF and its baselines", "baselines": "baselines", "flower": "Flower engine",
                "privacy": "differential privacy", "tracking": "experiment tracking", "output": "output"}


class UsageError(Exception):
    """An argparse mistake, reported as one line by `main` (argparse would print the whole usage)."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the command's --help instead of its full usage
    (`fedpeft run`'s usage alone is ~50 lines)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(" ".join(message.split()), self.prog)


def _type_of(f: dataclasses.Field):
    ann = str(f.type)
    if ann.startswith("list"):
        return str, "+"
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if ann.startswith(name):
            return typ, None
    return str, None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    groups = {}
    for f, group in field_help():
        if group not in groups:
            groups[group] = parser.add_argument_group(GROUP_TITLES.get(group, group))
        g = groups[group]
        names = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:
            names.append("--" + f.name)
        typ, nargs = _type_of(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, [], False) else "")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typ is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        else:
            g.add_argument(*names, type=typ, nargs=nargs, choices=f.metadata.get("choices"),
                           metavar=None if f.metadata.get("choices") else f.name.split("_")[-1].upper(), **kw)


def _suite(args: argparse.Namespace):
    """The bench/tune suite, with its task swap resolved (and said)."""
    from fedpeft.bench.suites import get_suite, with_swap

    suite, said = with_swap(get_suite(args.suite), args.fourth_task, args.data_dir)
    if said:
        print(said, file=sys.stderr, flush=True)
    return suite


def build_parser() -> argparse.ArgumentParser:
    from fedpeft.bench.suites import SUITES

    _SUITES = ", ".join(SUITES)
    parser = Parser(
        prog="fedpeft", description="Federated parameter-efficient fine-tuning: FedLEASE, LEFF and their baselines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="train and evaluate a federation",
                         description="Train and evaluate a federation. Flags override --config.")
    run.add_argument("--config", metavar="FILE", help="TOML (or config.json) file of settings; flags override it")
    add_config_flags(run)
    demo = sub.add_parser("demo", help="a small offline federation on the bundled demo data and MiniLM")
    demo.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None, help="run folder")
    demo.add_argument("--method", default=None, help="method to demonstrate (default: the demo's)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    report = sub.add_parser("report", help="print the summary of a finished or stopped run")
    report.add_argument("run_dir", help="a run folder")
    export = sub.add_parser("export", help="write a run's adapters as standard PEFT LoRA folders, with a model card",
                            description="Write the adapters the clients use (every FedLEASE expert, the global LoRA, "
                                        "each FedSA-LoRA client's A and B, FedDPA's global and local LoRAs, ...) as "
                                        "PEFT adapters that peft.PeftModel.from_pretrained loads, with routers and heads "
                                        "beside them, manifest.json and a model card (README.md).")
    export.add_argument("run_dir", help="a run folder")
    export.add_argument("--out", default=None, help="destination (default: RUN_DIR/export)")
    export.add_argument("--merge", action="store_true",
                        help="also fold the one adapter into the base weights and save merged/, a plain transformers "
                             "folder with the tokenizer (methods whose clients all use one adapter: fedit, ffa-lora, "
                             "fedprox, fedlora, slora)")
    bench = sub.add_parser("bench", help="run a method matrix on one federation and tabulate it",
                           description="Run a suite's method matrix into OUT/SUITE/LABEL-seedK/ (finished runs "
                                       "are skipped, stopped ones resumed) and write results.md, results.csv "
                                       "and results.png there. Suites: " + _SUITES + ".")
    bench.add_argument("--suite", required=True, help=_SUITES)
    bench.add_argument("--seeds", type=int, nargs="+", default=[1], metavar="K",
                       help="seeds to repeat the main methods with (ablations: the first only); default 1")
    bench.add_argument("--out", default="bench", help="results root (default: ./bench)")
    bench.add_argument("--methods", nargs="+", default=None, metavar="LABEL",
                       help="only these labels of the suite (e.g. fedit fedlease)")
    bench.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                       help="data root with GLUE task folders (glue/SST-2/{train,dev}.tsv, ...) and "
                            "e2e/, webnlg/ for generation tasks (default: $FEDPEFT_DATA_DIR)")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads per run (e.g. 1 to run two benches side by side)")
    bench.add_argument("--fourth-task", default="auto", metavar="auto|cola|qqp",
                       help="glue4 suites: QQP (the paper's) instead of CoLA when its data can be had (auto, the "
                            "default: a local QQP folder, else a reachable hub), or force one")
    bench.add_argument("--encoder-path", "--encoder_path", dest="encoder_path", default=None,
                       choices=ENCODER_PATHS,
                       help="every run of the matrix with this --encoder-path (default: the suite's, i.e. "
                            "RunConfig's); it changes a run's numbers, so compare the two in separate --out roots")
    bench.add_argument("--decoder-path", "--decoder_path", dest="decoder_path", default=None,
                       choices=DECODER_PATHS,
                       help="every run of the matrix with this --decoder-path (as --encoder-path; decoder runs "
                            "made before the setting ran padded: pass padded to go on with them)")
    bench.add_argument("--report-only", action="store_true",
                       help="run nothing: tabulate the finished runs of the matrix and list the others")
    bench.add_argument("--archive", default=None, metavar="DIR",
                       help="also copy every finished run's records (settings, history, predictions, log; no "
                            "model state) to DIR/SUITE/LABEL-seedK/, small enough to commit: a later --out DIR, "
                            "on any machine, reports them and runs only the rest of the matrix")
    bench.add_argument("--tracking", choices=("none", "tensorboard", "mlflow"), default=None,
                       help="log each run as its own run under one experiment named after the suite, in "
                            "OUT/SUITE/mlflow.db or OUT/SUITE/tensorboard/ (pip install 'fedpeft[tracking]')")
    bench.add_argument("--tracking-uri", "--tracking_uri", dest="tracking_uri", default=None,
                       help="mlflow: another tracking URI; tensorboard: another folder for the event folders")
    tune = sub.add_parser("tune", help="choose a setting per method on a validation carve-out (never on test)",
                          description="Run each main method of a suite once per value of one setting, every run "
                                      "scored on a stratified hold-out of each client's training data "
                                      "(--validation-fraction), and write OUT/SUITE-tune/tune-PARAM.md and .csv "
                                      "with the best value per method. Finished grid points are skipped.")
    tune.add_argument("--suite", required=True, help=_SUITES)
    tune.add_argument("--param", required=True, help="the setting to grid over, e.g. lr")
    tune.add_argument("--values", required=True, nargs="+", metavar="V", help="its values, e.g. 1e-3 3e-3 1e-2")
    tune.add_argument("--validation-fraction", type=float, default=0.2,
                      help="share of each client's training data held out for scoring (default 0.2)")
    tune.add_argument("--seeds", type=int, nargs="+", default=[1], metavar="K", help="seeds per grid point (default 1)")
    tune.add_argument("--methods", nargs="+", default=None, metavar="LABEL",
                      help="suite labels to tune (default: the main methods, not the ablations)")
    tune.add_argument("--out", default="bench", help="results root (default: ./bench)")
    tune.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                      help="data root with GLUE task folders (glue/SST-2/{train,dev}.tsv, ...) and "
                           "e2e/, webnlg/ for generation tasks (default: $FEDPEFT_DATA_DIR)")
    tune.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    tune.add_argument("--fourth-task", default="auto", metavar="auto|cola|qqp", help="as for bench")
    tune.add_argument("--report-only", action="store_true", help="run nothing: tabulate the finished grid points")
    tune.add_argument("--archive", default=None, metavar="DIR",
                      help="also copy every finished grid point's records to DIR (as for bench)")
    flower = sub.add_parser("flower", help="files for a multi-machine Flower deployment (see docs/flower.md)",
                            description="Write the files a Flower deployment needs; docs/flower.md's "
                                        "'Several machines' section gives the commands around them.")
    fsub = flower.add_subparsers(dest="flower_command", required=True, metavar="WHAT")
    fsub.add_parser("app", help="the Flower App folder `flwr run` submits").add_argument("dir")
    certs = fsub.add_parser("certs", help="a CA and a SuperLink TLS certificate")
    certs.add_argument("dir")
    certs.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                       help="names/IPs SuperNodes use to reach the SuperLink (default: 127.0.0.1 localhost)")
    certs.add_argument("--force", action="store_true", help="replace existing certificate and key files")
    node_key = fsub.add_parser("node-key", help="a SuperNode key pair (PATH, PATH.pub) for SuperNode authentication")
    node_key.add_argument("path")
    node_key.add_argument("--force", action="store_true", help="replace an existing key pair")
    conn = fsub.add_parser("connection", help="add a SuperLink connection to $FLWR_HOME/config.toml (default ~/.flwr)")
    conn.add_argument("name")
    conn.add_argument("address", help="HOST:PORT of the SuperLink")
    conn.add_argument("--root-certificates", default=None, help="the CA file (ca.crt)")
    conn.add_argument("--insecure", action="store_true",
                      help="no TLS (127.0.0.1 or a trusted network only): refused unless given when there is no CA")
    return parser


def flower_command(args: argparse.Namespace) -> None:
    import os

    from fedpeft.engines.flower import deploy

    if args.flower_command == "app":
        print(f"Flower App folder: {deploy.write_app(args.dir)}")
    elif args.flower_command == "certs":
        for role, path in deploy.write_certificates(args.dir, args.hosts, force=args.force).items():
            print(f"{role}: {path}")
    elif args.flower_command == "node-key":
        priv, pub = deploy.write_node_key(args.path, force=args.force)
        print(f"private key (keep on the node): {priv}\npublic key (register on the SuperLink): {pub}")
    else:
        home = os.environ.get("FLWR_HOME") or os.path.expanduser("~/.flwr")
        path = deploy.write_connection(home, args.name, args.address, root_certificates=args.root_certificates,
                                       insecure=args.insecure)
        if not args.root_certificates:
            import sys

            print(deploy.INSECURE_WARNING.format(name=args.name, address=args.address), file=sys.stderr)
        print(f"connection {args.name!r} in {path}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    settings = read_settings(args.config) if getattr(args, "config", None) else {}
    if settings:
        RunConfig.from_dict(settings, source=args.config)  # the file's own mistakes name the file
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    merged = {**{k.replace("-", "_") if isinstance(k, str) else k: v for k, v in settings.items()}, **given}
    return RunConfig.from_dict(merged, source="the command line")


def demo_config(args: argparse.Namespace) -> RunConfig:
    """FedLEASE on 3 demo tasks × 2 clients with the packaged MiniLM: offline, a few minutes on 2 cores.

    The head is frozen, as in the official FedLEASE code: the LoRA then carries all of the task, so
    after 3 warmup rounds the B matrices separate by task and the clustering finds the 3 tasks.
    """
    tasks = [t for t in ("demo-sentiment", "demo-topic", "demo-question") for _ in range(2)]
    return RunConfig(method=args.method or "fedlease", tasks=tasks, model_name="minilm", train_samples=256,
                     test_samples=80, global_rounds=5, warmup_rounds=3, local_epochs=2, lr=3e-3,
                     batch_size=32, max_length=64, rank=4, max_clusters=4, head_policy="frozen",
                     output_dir=args.output_dir, quiet=args.quiet)


def print_summary(run_dir: Path) -> None:
    summary = run_dir / "summary.md"
    if not summary.is_file():
        raise FedPeftError(f"{run_dir} has no summary.md: is it a fedpeft run folder?")
    print(summary.read_text(errors="replace"))
    print(f"Run folder: {run_dir}  (config.json, training_log.txt, training_history.json, metrics.csv, "
          f"summary.md, learning_curves.png)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        words = sys.argv[1:] if argv is None else list(argv)
        commands = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        prog = exc.prog
        if prog == "fedpeft" and words and words[0] in commands:  # extra arguments are found by the top parser
            prog = f"fedpeft {words[0]}"
        print(f"fedpeft: error: {exc} (see `{prog} --help`)", file=sys.stderr)
        return 2
    try:
        if args.command == "report":
            from fedpeft.records.history import read_history

            run_dir = Path(args.run_dir)
            history = read_history(run_dir)  # one clear error for a folder that is not a run, or a damaged history
            if not (run_dir / "summary.md").is_file():
                try:
                    history.finish()
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise FedPeftError(f"{run_dir}/training_history.json is not a fedpeft training history "
                                       f"(no summary can be made of it: {exc!r})") from None
            print_summary(run_dir)
            return 0
        if args.command == "export":
            from fedpeft.run.export import export_run
            from fedpeft.records.history import setup_logging

            setup_logging(None, quiet=False)
            out = export_run(args.run_dir, args.out, merge=args.merge)
            print(f"Exported to {out} (manifest.json lists the adapters, README.md is the model card)")
            return 0
        if args.command == "flower":
            flower_command(args)
            return 0
        if args.command == "bench":
            from fedpeft.bench.matrix import bench as run_bench

            run_bench(_suite(args), args.seeds, args.out, labels=args.methods, data_dir=args.data_dir,
                      threads=args.threads, report_only=args.report_only, tracking=args.tracking,
                      tracking_uri=args.tracking_uri, encoder_path=args.encoder_path,
                      decoder_path=args.decoder_path, archive=args.archive)
            return 0
        if args.command == "tune":
            from fedpeft.bench.tune import parse_values, tune as run_tune

            parse_values(args.param, args.values)  # a bad grid fails before anything is said or probed
            run_tune(_suite(args), args.param, args.values, fraction=args.validation_fraction,
                     seeds=args.seeds, out=args.out, labels=args.methods, data_dir=args.data_dir,
                     threads=args.threads, report_only=args.report_only, archive=args.archive)
            return 0
        cfg = demo_config(args) if args.command == "demo" else config_from_args(args)
        from fedpeft.run import run

        result = run(cfg)
        print_summary(result.run_dir)
        return 0
    except RunFailed as exc:
        print(f"fedpeft: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except FedPeftError as exc:
        print(f"fedpeft: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (f"run the same `fedpeft {args.command}` command again to continue" if args.command in ("bench", "tune")
                else "continue with `fedpeft run --resume RUN_DIR`")
        print(f"fedpeft: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
