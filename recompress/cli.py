"""The command line: a thin Click layer over the stages (each command = check outputs, load, call one stage, write).

Start-up imports no torch (the method registry is declared torch-free), so ``--help`` answers at once.
Every error a user can cause, ours or Click's, prints one line ``error: ...; hint: ...`` and exits 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import click

from . import __version__
from .data.sequence_layouts import get_layout
from .data.sequence_layouts import names as layout_names
from .errors import UserError

EXIT_USER, EXIT_INTERRUPTED = 2, 130


def fail(message: str, hint: str | None = None, code: int = EXIT_USER) -> None:
    click.echo(f"error: {message}" + (f"; hint: {hint}" if hint else ""), err=True)
    sys.exit(code)


class Group(click.Group):
    """Runs the command line with one error style: user errors and usage errors on one line, exit 2;
    Ctrl-C says that nothing partial was kept (exit 130); anything else is a bug (traceback, exit 1)."""

    argv: ClassVar[list[str]] = []  # the arguments of this run (``--nproc`` relaunches with them)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            self._run(args, prog_name, complete_var, **extra)
        except SystemExit as e:
            from .distributed import exit_process
            exit_process(e.code)  # under torchrun: without the interpreter's finalization (see there)
            raise

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> None:
        Group.argv = list(sys.argv[1:] if args is None else args)
        with _sigterm_restored():
            self._run_once(args, prog_name, complete_var, **extra)

    def _run_once(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> None:
        try:
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except BaseException:
                from .distributed import stopping
                stopping()  # under torchrun, a failing rank exits without being interrupted again
                raise
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            msg = " ".join(e.format_message().split()).rstrip(".")
            fail(msg[:1].lower() + msg[1:], f"see '{ctx.command_path if ctx else 'recompress'} --help'", e.exit_code)
        except UserError as e:
            fail(e.message, e.hint)
        except (KeyboardInterrupt, click.Abort):
            click.echo("interrupted; no partial output was kept", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@contextlib.contextmanager
def _sigterm_restored() -> Iterator[None]:
    """A command takes SIGTERM over (recompress.distributed.join: unwind as Ctrl-C does); in one process the
    previous handler comes back afterwards, so that a caller running commands in-process (tests, notebooks)
    keeps its own."""
    import signal
    import threading

    from .distributed import size
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None and size() <= 1:
            signal.signal(signal.SIGTERM, previous)


def ints(text: str | None, what: str = "value") -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of integers", "e.g. 1,64,512") from None


def names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


def out_option(what: str) -> Any:
    return click.option("-o", "--out", required=True, type=click.Path(), help=f"{what} to create (missing parent "
                        "folders are created)")


OVERWRITE = click.option("--overwrite", is_flag=True, help="replace the output if recompress wrote it (a folder "
                         "holding anything else is never replaced)")


def train_options(keep_best: bool) -> Any:
    """The shared training / fine-tune budget options (``keep_best``: that flag's default)."""
    from .trainconfig import OPTIMIZERS, SHARDINGS
    return lambda f: _add(f, [
        click.option("--epochs", default=1, show_default=True, help="passes over the train split"),
        click.option("--steps", type=int, default=None, help="cap on optimizer steps (overrides epochs)"),
        click.option("--lr", default=1e-3, show_default=True, help="learning rate"),
        click.option("--batch-size", default=256, show_default=True, help="rows per optimizer step"),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
                     help="adam: Adam for dense layers, SparseAdam for table rows (state: 2x each table); "
                          "rowwise-adagrad: Adagrad for dense layers, FBGEMM's row-wise Adagrad for table rows "
                          "(state: 4 bytes per row)"),
        click.option("--seed", default=0, show_default=True, help="seed for initialization and shuffling"),
        click.option("--keep-best/--no-keep-best", default=keep_best, show_default=True,
                     help="score validation 4 times per epoch, stop after 2 checks without gain, keep the best model"),
        click.option("--shard-tables", "shard", type=click.Choice(SHARDINGS), default=None,
                     help="with --nproc N (or torchrun): shard the plain tables across the processes with TorchRec, "
                          "each table on one process (table-wise) or its columns cut across them (column-wise), "
                          "instead of a whole copy on each; needs torchrec and an optimizer other than adam"),
    ])


HP = click.option("--hp", "hp", multiple=True, metavar="KEY=VALUE",
                  help="a hyper-parameter an upstream checkpoint does not record (or to override what it says), "
                       "e.g. --hp qr_operation=add; 'recompress inspect CKPT' lists them (repeatable)")
DISTRIBUTED = ("train", "checkpoint")  # the commands that run under torchrun
NPROC = click.option("--nproc", type=click.IntRange(min=1), default=None,
                     help="train on N local processes: runs this command under 'torchrun --standalone "
                          "--nproc-per-node N' (for several machines, call torchrun yourself)")


def planned_ranks(nproc: int | None) -> int | None:
    """The number of ranks ``launch`` will start (``--nproc`` in one process), else None: the run's own (under
    torchrun, ``launch`` refuses ``--nproc`` itself)."""
    from . import distributed
    return nproc if distributed.size() == 1 else None


def launch(nproc: int | None) -> None:
    """With ``--nproc N`` > 1 in one process: run this same command under torchrun (its launcher, in this
    process) and exit 0, or with the first failed rank's status after its own error message."""
    from . import distributed
    if nproc is None or (nproc == 1 and distributed.size() == 1):
        return
    if distributed.size() > 1:
        raise UserError("--nproc is for a run started in one process, and this one runs under torchrun",
                        "drop --nproc and set the number of processes with torchrun's --nproc-per-node")
    import logging
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args, skip = [], False
    for a in Group.argv:
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        args.append(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what failed
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=1", "-m",
                                          "recompress", *args]))  # a rank that lost its peer has time to say so
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        fail(f"rank {rank} of {nproc} failed first (exit status {failure.exitcode}); its error is above",
             code=failure.exitcode if failure.exitcode > 0 else 1)
    sys.exit(0)


def _add(f: Any, options: list[Any]) -> Any:
    for opt in reversed(options):
        f = opt(f)
    return f


def method_options(fresh_only: bool = False) -> Any:
    """One --option per method parameter, straight from the registry (``fresh_only``: methods that can
    train from scratch)."""
    from .compress.registry import METHODS, all_params

    def deco(f: Any) -> Any:
        methods = [m for m in METHODS.values() if m.fresh is not None or not fresh_only]
        for p in reversed([p for p in all_params(methods).values() if not (fresh_only and p.name == "finetune")]):
            if p.type is bool:
                f = click.option(p.flag, p.name, is_flag=True, help=p.help)(f)
            else:
                kind = click.Choice(p.choices) if p.choices else p.type
                f = click.option(p.flag, p.name, type=kind, default=p.default, help=p.help,
                                 show_default=p.default is not None)(f)
        return f
    return deco


def family_options(f: Any) -> Any:
    """One --option per family hyper-parameter (declared in recompress/families.py); None = the family's default."""
    from .families import all_hparams
    for name, owners in reversed(list(all_hparams().items())):
        p = owners[0][1]
        defaults = ", ".join(f"{fam} {q.default}" for fam, q in owners)
        text = f"{'; '.join(dict.fromkeys(q.help for _, q in owners))} (default: {defaults})"
        if p.type is bool:
            f = click.option(f"{p.flag}/--no-{p.flag[2:]}", p.name, default=None, help=text)(f)
        else:  # each family checks its own choices (Family.hparams)
            choices = list(dict.fromkeys(c for _, q in owners for c in q.choices or ()))
            kind = click.Choice(choices) if choices else p.type
            f = click.option(p.flag, p.name, type=kind, default=None, help=text)(f)
    return f


def train_config(kw: dict[str, Any]) -> Any:
    from .trainconfig import TrainConfig
    return TrainConfig(epochs=kw.pop("epochs"), steps=kw.pop("steps"), lr=kw.pop("lr"),
                       batch_size=kw.pop("batch_size"), optimizer=kw.pop("optimizer"), seed=kw.pop("seed"),
                       keep_best=kw.pop("keep_best"), shard=kw.pop("shard"))


def echo_table(table: Any) -> None:
    from rich.console import Console
    Console(width=max(120, Console().width)).print(table)


def val_story(entries: list[dict[str, Any]], metric: str) -> list[str]:
    """``hash: validation auc 0.7412 -> 0.7230 compressed -> 0.7398 fine-tuned`` for each history entry
    (``metric``: the family's primary metric)."""
    lines = []
    for h in entries:
        chain = [(label, h.get(k)) for label, k in (("before", "val_before"), ("compressed", "val_after_init"),
                                                    ("fine-tuned", "val_after_finetune"))]
        if h.get("method") == "mlet" and h.get("before"):
            chain = [("before", h["before"]), ("projected", h.get("projected")),
                     ("fine-tuned", (h.get("finetune") or {}).get("val"))]
        shown = [f"{v[metric]:.4f} {label}" for label, v in chain if v and metric in v]
        if len(shown) > 1:
            lines.append(f"{h['method']}: validation {metric} " + " -> ".join(shown))
    return lines


@click.group("recompress", cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="recompress")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Compress trained recommender checkpoints, export them, and measure accuracy x bytes x latency.

    \b
    Typical flow:
      recompress data criteo train.txt.gz -o data/criteo
      recompress train --data data/criteo --dim 16 -o ckpt/base
      recompress checkpoint ckpt/base --method mlet --dim 4 --data data/criteo -o ckpt/mlet4
      recompress export ckpt/mlet4 --target onnx --data data/criteo -o export/mlet4
      recompress evaluate export/mlet4 --data data/criteo

    train and checkpoint also run data-parallel under torchrun (or with --nproc N).
    """
    from .distributed import join
    join(ctx.invoked_subcommand or "", DISTRIBUTED)


@main.result_callback()
def _done(*_: Any, **__: Any) -> None:
    """After a command succeeded: under torchrun, every rank leaves the process group together."""
    from .distributed import leave
    leave()


@main.group()
def data() -> None:
    """Prepare datasets (a folder of memory-mapped splits that every other command reads)."""


@data.command("criteo")
@click.argument("source", type=click.Path(dir_okay=False))
@out_option("dataset folder")
@click.option("--min-count", default=2, show_default=True, help="values seen fewer times in train map to the OOV row")
@click.option("--max-rows", type=int, default=None, help="cap each table at this many rows (most frequent kept)")
@click.option("--val", default=0.1, show_default=True, help="validation fraction")
@click.option("--test", default=0.1, show_default=True, help="test fraction")
@click.option("--seed", default=0, show_default=True, help="split seed")
@click.option("--limit", type=int, default=None, help="read only the first N rows")
@click.option("--layout", type=click.Choice(["recompress", "dlrm"]), default="recompress", show_default=True,
              help="recompress: vocabularies from the train split, most frequent first, an OOV row, hashed split; "
                   "dlrm: facebookresearch/dlrm's own ids and days split (train days 0-5, test = first half of day 6), "
                   "to evaluate a model dlrm trained; SOURCE may then be dlrm's kaggleAdDisplayChallenge_processed.npz")
@click.option("--max-ind-range", type=int, default=None, help="dlrm layout: dlrm's --max-ind-range (hashes modulo it)")
@OVERWRITE
@click.pass_context
def data_criteo(ctx: click.Context, source: str, out: str, layout: str, max_ind_range: int | None, **kw: Any) -> None:
    """Read a Criteo TSV (train.txt or .gz; label, I1-I13, C1-C26) in bounded memory."""
    if layout == "dlrm":
        from click.core import ParameterSource
        given = [k for k in ("min_count", "max_rows", "val", "test", "seed")
                 if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in given)} does not apply to --layout dlrm",
                            "dlrm's layout fixes its vocabularies and split; drop the option")
        from .data.criteo_dlrm import prepare_criteo_dlrm
        prepare_criteo_dlrm(source, out, max_ind_range=max_ind_range, limit=kw["limit"], overwrite=kw["overwrite"])
        return
    if max_ind_range is not None:
        raise UserError("--max-ind-range applies to --layout dlrm only", "add --layout dlrm, or drop it")
    from .data.criteo import prepare_criteo
    prepare_criteo(source, out, **kw)


@data.command("synthetic")
@out_option("dataset folder")
@click.option("--samples", default=200_000, show_default=True, help="rows to generate (80/10/10 split)")
@click.option("--tables", default="100000,20000,5000,1000,200,50", show_default=True, help="rows per table")
@click.option("--zipf", default=1.05, show_default=True, help="popularity exponent")
@click.option("--true-dim", default=8, show_default=True, help="width of the planted ground-truth vectors")
@click.option("--seed", default=0, show_default=True, help="generator seed")
@OVERWRITE
def data_synthetic(out: str, tables: str, **kw: Any) -> None:
    """Generate a SYNTHETIC Criteo-like dataset with a planted ground-truth model."""
    from .data.synthetic import make_synthetic
    make_synthetic(out, table_rows=list(ints(tables, "--tables")), **kw)


@data.command("sequences")
@click.argument("source", type=click.Path(dir_okay=False))
@out_option("dataset folder")
@click.option("--format", "fmt", default=None,
              type=click.Choice(["lines", "pairs", "recbole", "movielens", "movielens-dat", "gr"]),
              help="lines: 'u i1 i2 ...'; pairs: 'u i' per line in time order; recbole: an atomic .inter file; "
                   "movielens: ratings.csv; movielens-dat: ML-1M/10M ratings.dat (u::i::rating::time); gr: generative-recommenders' sasrec_format.csv (default: detected from "
                   "the first lines)")
@click.option("--max-len", type=int, default=None, help="keep each user's most recent N interactions (default: all)")
@click.option("--min-items", type=int, default=None, help="drop users with fewer interactions [default: 3, what "
              "leave-one-out needs; 4 with --layout sasrec, 5 with --layout torchrec]")
@click.option("--layout", type=click.Choice(layout_names()), default="recompress", show_default=True,
              help="whose ids, order and evaluation rules, to evaluate a model another trainer made on this file: "
                   + "; ".join(f"{n} ({get_layout(n).help})" for n in layout_names()))
@click.option("--seed", type=int, default=None,
              help="--layout torchrec: the seed of NumPy's legacy generator for its negatives (the example's own "
                   "draws when its run called np.random.seed with it) [default: 0]")
@click.option("--items", type=click.Path(dir_okay=False), default=None,
              help="--layout gr: the catalogue full ranking ranks: a CSV with a movie_id, movieId or item_id column "
                   "(e.g. the movies.csv its DataProcessor writes), or a number N for ids 1..N (amzn-books: its "
                   "expected_num_unique_items, 695762) [default: every item of the file]")
@OVERWRITE
def data_sequences(source: str, out: str, fmt: str | None, **kw: Any) -> None:
    """Read item sequences (one per user) into a leave-one-out dataset: the last item is the test target,
    the second to last the validation target."""
    from .data.sequences import prepare_sequences
    prepare_sequences(source, out, fmt=fmt, **kw)


@data.command("synthetic-sequences")
@out_option("dataset folder")
@click.option("--users", default=5000, show_default=True, help="users to generate")
@click.option("--items", default=2000, show_default=True, help="items")
@click.option("--mean-len", default=20, show_default=True, help="mean sequence length")
@click.option("--clusters", default=40, show_default=True, help="item clusters whose cycles users follow")
@click.option("--seed", default=0, show_default=True, help="generator seed")
@OVERWRITE
def data_synthetic_sequences(out: str, **kw: Any) -> None:
    """Generate SYNTHETIC item sequences with a planted, learnable next-item structure (and timestamps)."""
    from .data.synthetic_sequences import make_synthetic_sequences
    make_synthetic_sequences(out, **kw)


def _model_choices() -> list[str]:
    from .families import FAMILIES
    return list(FAMILIES)


@main.command()
@click.option("--data", "data_path", required=True, type=click.Path(), help="prepared dataset folder")
@out_option("checkpoint folder")
@click.option("--model", "family_name", type=click.Choice(_model_choices()), default="dlrm", show_default=True,
              help="model family (dlrm trains on CTR datasets, the others on sequence datasets)")
@family_options
@click.option("--mlet-hidden", type=int, default=None, help="train tables as MLET (rows x k)(k x d), k >= d")
@click.option("--mlet-min-rows", default=0, show_default=True, help="only tables with at least this many rows")
@click.option("--keep-two-layer", is_flag=True, help="save MLET tables uncollapsed")
@click.option("--method", default=None, help="train tables in this compressed form from scratch (tt, hash, qr, freqhash)")
@method_options(fresh_only=True)
@click.option("--min-rows", "method_min_rows", default=0, show_default=True, help="--method only for tables with this many rows")
@train_options(keep_best=False)
@NPROC
@OVERWRITE
def train(data_path: str, out: str, family_name: str, overwrite: bool, mlet_hidden: int | None, mlet_min_rows: int,
          keep_two_layer: bool, method: str | None, method_min_rows: int, nproc: int | None, **kw: Any) -> None:
    """Train a model from scratch and write a native checkpoint."""
    from .outputs import check_output
    check_output(out, overwrite=overwrite, inputs=[data_path])
    from .families import all_hparams
    hparams = {k: kw.pop(k) for k in list(kw) if k in all_hparams()}
    cfg = train_config(kw)
    cfg.validate(ranks=planned_ranks(nproc))
    launch(nproc)
    from .checkpoint import save_checkpoint
    from .data import open_dataset
    from .families import get_family
    from .training import train_model
    family = get_family(family_name)
    given = {k for k, v in hparams.items() if v is not None}
    foreign = sorted(given - {p.name for p in family.info.hparams})
    if foreign:
        raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in foreign)} does not apply to {family_name}",
                        f"{family_name} takes {', '.join(p.flag for p in family.info.hparams)}")
    if method is not None and mlet_hidden is not None:
        raise UserError("--mlet-hidden and --method cannot be combined in one training run",
                        "train with one, then compress with 'recompress checkpoint'")
    make_table, history = None, []
    if method is not None:
        from .compress.registry import fresh_tables
        params = {k: v for k, v in kw.items() if v is not None}
        make_table = fresh_tables(method, params, method_min_rows, cfg.seed)
        history = [{"method": method, "params": params, "min_rows": method_min_rows, "from_scratch": True}]
    ckpt = train_model(family, open_dataset(data_path), cfg, hparams, make_table=make_table, mlet_hidden=mlet_hidden,
                       mlet_min_rows=mlet_min_rows, keep_two_layer=keep_two_layer, history=history)
    from .distributed import finished, is_main
    finished()
    if not is_main():
        return
    save_checkpoint(ckpt, out, overwrite=overwrite, inputs=[data_path])
    val = ckpt.spec.metrics["train"].get("val")
    shown = ", ".join(f"{m} {val[m]:.4f}" for m in family.metrics[:2]) if val else ""
    click.echo(f"wrote {out}" + (f"  (validation {shown})" if val else ""))


@main.command()
@click.argument("source", type=click.Path())
@click.option("--method", "method", required=True,
              help="method or composition applied in order, e.g. mlet,int8 or tt@>=100000,int8 (METHOD@>=ROWS or "
                   "METHOD@T1+T2 limits one step to some tables)")
@method_options()
@click.option("--data", "data_path", type=click.Path(), default=None, help="prepared dataset (for fine-tuning)")
@click.option("--tables", default=None, help="comma-separated table names (default: all)")
@click.option("--min-rows", default=0, show_default=True, help="only tables with at least this many rows")
@train_options(keep_best=True)
@NPROC
@HP
@out_option("checkpoint folder")
@OVERWRITE
def checkpoint(source: str, method: str, data_path: str | None, tables: str | None, min_rows: int,
               out: str, overwrite: bool, nproc: int | None, hp: tuple[str, ...], **kw: Any) -> None:
    """Compress a trained checkpoint (any supported format) into a native checkpoint."""
    from .outputs import check_output
    inputs = [source, data_path]
    check_output(out, overwrite=overwrite, inputs=inputs)
    source, overrides = checkpoint_source(source, hp)
    from .compress.registry import Context, Selection, check_sharding, compress, parse_methods
    cfg = train_config(kw)
    cfg.validate(ranks=planned_ranks(nproc))
    steps = parse_methods(method, kw)
    check_sharding(steps, cfg)
    launch(nproc)
    from .adapters import describe, load_any, load_streamed
    from .checkpoint import is_native, save_checkpoint
    from .compress.stream import native_source, stream_compress, streams
    if overrides:
        describe(source, overrides)  # refuses --hp where it does not apply, or a key or value it does not know
    from .data import open_dataset
    from .distributed import finished, is_main
    from .models import family_of
    ctx = Context(open_dataset(data_path) if data_path else None, cfg, Selection(names(tables), min_rows))
    if streams(steps, ctx):  # plain tables read and written in blocks where the format allows: flat memory
        if not is_main():  # nothing to train: rank 0 streams alone
            return
        first = native_source(Path(source)) if is_native(Path(source)) else load_streamed(source, overrides)
        done = len(first[0].spec.history)
        ckpt, before = stream_compress(first, steps, ctx, out, overwrite=overwrite, inputs=tuple(inputs),
                                       provenance={"compressed_from": str(source)})
    else:
        ckpt = load_any(source, overrides)
        before = sum(t.stored_bytes() for t in ckpt.model.tables.values())
        if ctx.data is not None:
            family_of(ckpt.spec).check(ckpt.spec, ctx.data)
        done = len(ckpt.spec.history)
        ckpt = compress(ckpt, steps, ctx)
        ckpt.spec.provenance.setdefault("compressed_from", str(source))
        finished()
        if not is_main():
            return
        save_checkpoint(ckpt, out, overwrite=overwrite, inputs=inputs)
    after = sum(t.stored_bytes() for t in ckpt.model.tables.values())
    for line in val_story(ckpt.spec.history[done:], family_of(ckpt.spec).primary):
        click.echo(line)
    click.echo(f"wrote {out}: embedding bytes {before:,} -> {after:,} ({before / after:.2f}x smaller)")


def checkpoint_source(source: str, hp: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The checkpoint ``source`` names and the ``--hp`` to read it with: for an export in an upstream layout
    (``--target dlrm|torchrec``), the file in it with the hyper-parameters its manifest records (the user's
    ``--hp`` win), as ``evaluate`` reads it; an export to a runtime is refused, naming the checkpoint it came
    from."""
    from .adapters import parse_hp
    from .export.manifest import checkpoint_in, is_export, read_manifest
    user, path = parse_hp(hp), Path(source)
    upstream = checkpoint_in(path, user)
    if upstream is not None:
        return str(upstream[0]), upstream[1]
    if not is_export(path):
        return source, user
    m = read_manifest(path)
    src = (m.get("source") or {}).get("path")
    raise UserError(f"{path} is an export ({m.get('target')}), not a checkpoint",
                    f"pass the checkpoint it came from{': ' + src if src else ''}")


def _targets() -> list[str]:
    from .export.targets import TARGETS
    return list(TARGETS)


@main.command()
@click.argument("source", type=click.Path())
@click.option("--target", type=click.Choice(_targets()), default="onnx", show_default=True, help="export target")
@out_option("export folder")
@click.option("--data", "data_path", type=click.Path(), default=None, help="dataset whose test rows drive the parity check")
@click.option("--samples", default=2048, show_default=True, help="parity samples")
@click.option("--atol", type=float, default=None, help="parity tolerance, absolute (default 1e-5; 0.1 with --dense int8, whose cost evaluate reports)")
@click.option("--rtol", type=float, default=None, help="parity tolerance, relative (default 1e-4; 0 with --dense int8)")
@click.option("--materialize", is_flag=True, help="export every compressed table as a plain dense table")
@click.option("--quant-graph", type=click.Choice(["gather-dequant", "dequant-gather"]), default=None,
              help="quantized rows: gather then scale (small runtime memory; the onnx default), or "
                   "DequantizeLinear then gather (the form TensorRT keeps narrow; the trt default)")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="compute precision written into the graph (autocast casts; strongly typed engines follow it) "
                   "[default: trt fp16 for softmax attention models, else fp32; onnx fp32; bf16 is trt only]")
@click.option("--shapes", default=None, help="trt: engine shape ranges NAME=MIN:OPT:MAX,... over the model's axes "
              "(batch, bag, candidates) [default: the model family's; the manifest lists them]")
@click.option("--compute-capability", "compute_capability", multiple=True,
              help="trt (TensorRT-RTX): build ahead of time for this GPU compute capability, e.g. SM89; repeatable "
                   "[default: TensorRT-RTX's portable set]")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="trt: timing cache file read before and updated after the build (full TensorRT; TensorRT-RTX "
                   "ignores it)")
@click.option("--dense", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="dense layers in float, or int8 by ONNX Runtime's dynamic quantization (faster on CPUs with "
                   "VNNI; 'evaluate' reports the accuracy it costs)")
@click.option("--attention", type=click.Choice(["fused", "decomposed", "custom"]), default=None,
              help="sequential models: softmax attention as one ONNX Attention node (fused, opset 23) or MatMul/"
                   "Softmax (decomposed); HSTU decomposed or one recompress.HSTUAttention node (custom) "
                   "[default: the model's form for the target]")
@click.option("--scoring", type=click.Choice(["amortized", "naive"]), default=None,
              help="sequential models: the history computed once for all M candidates (amortized), or once per "
                   "candidate (naive, for comparison) [default: amortized; naive for a model that has only it, "
                   "the early-fusion ranker]")
@click.option("--candidates-layout", "layout", type=click.Choice(["shared", "per-row"]), default=None,
              help="sequential models: candidates [1, M] shared by every history in the batch (the full catalogue; "
                   "default for sasrec/hstu) or [batch, M], each history its own (default for the ranker)")
@HP
@OVERWRITE
def export(source: str, target: str, out: str, data_path: str | None, materialize: bool, quant_graph: str | None,
           precision: str | None, shapes: str | None, compute_capability: tuple[str, ...], timing_cache: str | None,
           dense: str, attention: str | None, scoring: str | None, layout: str | None, hp: tuple[str, ...],
           overwrite: bool, **kw: Any) -> None:
    """Export a checkpoint; fails (writing nothing) if the artifact disagrees with the checkpoint."""
    from .outputs import check_output
    check_output(out, overwrite=overwrite, inputs=[source, data_path])
    source, overrides = checkpoint_source(source, hp)
    from .adapters import load_any
    from .data import open_dataset
    from .export import export_checkpoint
    ckpt = load_any(source, overrides)
    ckpt.path = Path(source).resolve()
    m = export_checkpoint(ckpt, target, out, data=open_dataset(data_path) if data_path else None,
                          overwrite=overwrite,
                          opts={"materialize": materialize, "quant_graph": quant_graph, "dense": dense,
                                "attention": attention, "scoring": scoring, "layout": layout, "precision": precision,
                                "shapes": shapes, "compute_capability": list(compute_capability),
                                "timing_cache": timing_cache}, **kw)
    p = m["parity"]
    click.echo(f"wrote {out}: {', '.join(f'{k} ({v:,} B)' for k, v in m['files'].items())}; "
               + (f"parity max |diff| {p['max_abs_diff']:.2e}, allowed {p['atol']:g} + {p['rtol']:g}*|y| ({p['runtime']})"
                  if p["passed"] else f"parity not checked ({p['skipped']})"))
    dense = [n for n, how in m.get("tables_stored", {}).items() if "computed from" in how]
    if dense:
        click.echo(f"note: {len(dense)} table(s) written dense, their form having no equivalent in the {target} layout "
                   f"({', '.join(dense[:5])}{', ...' if len(dense) > 5 else ''}); table bytes "
                   f"{sum(m['table_bytes'].values()):,} -> {sum(m['exported_table_bytes'].values()):,}")
    if "engine" in m:
        e, lay = m["engine"], m["engine"]["layers"]
        click.echo(f"engine: {e['flavor']} {e['version']}, {m['precision']}, built in {e['build_seconds']} s for "
                   f"{', '.join(e['compute_capabilities'])}; {lay['fused_attention']} fused attention of "
                   f"{len(lay['attention'])}; table constants {lay['table_bytes']:,} B in the engine "
                   f"({sum(m['exported_table_bytes'].values()):,} B exported): "
                   + ("; ".join(f"{t['dtype']} {t['shape'][0]:,}x{t['shape'][1]} {t['stored']}" for t in lay["tables"][:3])
                      or "none found") + (f"; and {len(lay['tables']) - 3} more (manifest.json)" if len(lay["tables"]) > 3 else ""))
        if lay["attention_fallback"]:
            click.echo(f"note: {lay['attention_fallback']}")


@main.command()
@click.argument("source", type=click.Path())
@click.option("--data", "data_path", required=True, type=click.Path(), help="prepared dataset (its test split is used)")
@click.option("--batch-sizes", default=None, help="latency batch sizes [default: the family's: 1,64,512; dlrm_hstu 1]")
@click.option("--threads", default=2, show_default=True, help="intra-op threads for every backend")
@click.option("--repeats", default=200, show_default=True, help="timed rounds per batch size (every backend once "
              "per round; up to 4x more while the machine is noisy)")
@click.option("--no-latency", is_flag=True, help="accuracy and bytes only")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="the split whose accuracy is measured (val: e.g. to compare with the validation score a trainer "
                   "printed or stored)")
@click.option("--protocol", type=click.Choice(["full", "sampled", "pointwise"]), default=None,
              help="sequential models: rank the next item among all items (full) or among --negatives sampled ones "
                   "(default: the dataset's where its layout stores candidates, e.g. --layout torchrec: sampled; "
                   "else the family's: sasrec/hstu full, ranker sampled)")
@click.option("--negatives", default=100, show_default=True, help="sampled protocol: negatives per test user")
@click.option("--users", type=int, default=None, help="sequential models: evaluate a fixed random sample of this "
              "many test users (default: all)")
@click.option("--candidates", type=int, default=None, help="sequential models: time requests of one history with "
              "this many candidates each (--batch-sizes histories per call) instead of the protocol's")
@click.option("--attention", type=click.Choice(["fused", "decomposed", "triton"]), default=None,
              help="the torch backend's attention form (triton: the fused HSTU kernel, on CUDA) [default: the model's]")
@click.option("--json", "json_out", type=click.Path(), default=None, help="write results JSON here")
@click.option("--compare", type=click.Path(exists=True, dir_okay=False), default=None,
              help="results JSON of the baseline to compare with (this run is 'new')")
@HP
def evaluate(source: str, data_path: str, batch_sizes: str | None, threads: int, repeats: int, no_latency: bool,
             split: str, protocol: str | None, negatives: int, users: int | None, candidates: int | None,
             attention: str | None, json_out: str | None, compare: str | None, hp: tuple[str, ...]) -> None:
    """Accuracy (test split, or --split val), bytes and latency of a checkpoint or an export folder."""
    from .outputs import check_output
    if json_out:
        check_output(json_out, kind="file", inputs=[source, data_path, compare])
    if threads < 1 or repeats < 1 or any(b < 1 for b in ints(batch_sizes, "--batch-sizes")):
        raise UserError("--threads, --repeats and batch sizes must be >= 1", "fix the option")
    base = None
    if compare:
        try:
            base = json.loads(Path(compare).read_text())
            base["accuracy"], base["bytes"], base["data"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{compare} is not a results file from 'recompress evaluate --json'",
                            "pass a results JSON") from None
    from .adapters import parse_hp
    from .data import open_dataset
    from .evaluate import evaluate as run_eval
    from .evaluate.report import compare_table, paired_delta, results_table
    overrides = parse_hp(hp)
    data = open_dataset(data_path)
    if negatives < 1 or (users is not None and users < 1):
        raise UserError("--negatives and --users must be >= 1", "fix the option")
    from .evaluate.run import test_truth
    r = run_eval(source, data, batch_sizes=list(ints(batch_sizes)) or None, threads=threads, repeats=repeats,
                 latency=not no_latency, protocol=protocol, negatives=negatives, users=users, candidates=candidates,
                 attention=attention, hp=overrides, split=split)
    echo_table(results_table(r))
    if base is not None:
        delta = paired_delta(r, base, test_truth(r, data))
        echo_table(compare_table(r, base, delta))
        r["compare"] = {"baseline": compare, **delta}
    if json_out:
        from .outputs import write_json
        write_json(r, json_out, "results", inputs=[source, data_path, compare])


@main.command()
@click.argument("source", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="write the same to stdout as JSON")
@HP
def inspect(source: str, as_json: bool, hp: tuple[str, ...]) -> None:
    """Show what a checkpoint (any supported format) or export folder holds, running nothing from it:
    format, family, tables (rows, width, dtype, bytes, kind), every hyper-parameter with where it came
    from (checkpoint, file name, sidecar, shapes, user, default) and what must still be given with --hp."""
    from .adapters import parse_hp
    from .inspect import describe
    info = describe(source, parse_hp(hp))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    from .evaluate.report import fmt_bytes
    click.echo(f"{source}: {info['format']}{'' if info.get('kind') == 'export' else ' checkpoint'}, "
               f"family {info['family']}")
    name = max([14, *(len(t["name"]) for t in info["tables"])])  # columns as wide as their longest entry
    kind = max([12, *(len(t["kind"]) for t in info["tables"])])
    click.echo(f"  {'table':<{name}} {'role':<15} {'kind':<{kind}} {'rows':>12}   {'dim':<5} {'dtype':<9} {'bytes':>11}")
    for t in info["tables"]:
        click.echo(f"  {t['name']:<{name}} {t.get('role') or '':<15} {t['kind']:<{kind}} {t['rows']:>12,} x "
                   f"{t['dim']:<5} {t.get('dtype', ''):<9} {fmt_bytes(t['bytes']):>11}")
    click.echo(f"  embeddings {fmt_bytes(info['embedding_bytes'])}; history: "
               f"{', '.join(h['method'] for h in info['history']) or 'none'}")
    click.echo("hyper-parameters (source):")
    for k, v in info["hparams"].items():
        click.echo(f"  {k} = {json.dumps(v)}  ({info['hparam_source'].get(k, 'checkpoint')})")
    for m in info["missing"]:
        click.echo(f"still to supply: --hp {m['hp']}={'|'.join(m['values']) or 'VALUE'}  ({m['why']})")
    for n in info.get("notes", []):
        click.echo(f"note: {n}")


def _shipped() -> str:
    from .recipe import shipped
    return ", ".join(shipped())


def _run_and_report(recipe_arg: str, out: str | None, overwrite: bool, sets: tuple[str, ...],
                    sweep: tuple[str, ...] = (), extra_inputs: tuple[str | None, ...] = ()
                    ) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    from .outputs import run_folder
    from .pipeline import parse_sweep, run_recipe
    from .recipe import load_recipe
    from .sweep_report import write_reports
    r = load_recipe(recipe_arg, sets)
    extra = [v for s in sweep for v in parse_sweep(s)]
    folder = Path(out or f"runs/{r['name']}")
    parts = r.get("parts", [r])
    inputs = [recipe_arg if Path(recipe_arg).exists() else None, *[p["data"].get("path") for p in parts],
              *[p.get("baseline", {}).get("checkpoint") for p in parts], *extra_inputs]
    with run_folder(folder, overwrite=overwrite, inputs=inputs) as work:
        summary = run_recipe(r, work, extra)
        files = write_reports(summary, work)
    cached = sum(s["cached"] for s in summary["steps"])
    click.echo(f"{len(summary['rows'])} results ({cached} of {len(summary['steps'])} steps reused from cache) -> "
               + ", ".join(str(folder / files[k].name) for k in ("md", "html", "jsonl", "csv"))
               + f" (and {', '.join(f.name for k, f in files.items() if k not in ('md', 'html', 'jsonl', 'csv'))})")
    return summary, folder, r


def _recipe_help(f: Any) -> Any:
    import inspect as pyinspect
    f.__doc__ = pyinspect.cleandoc(f.__doc__ or "") + f"\n\nShipped recipes: {_shipped()}."
    return f


SET = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set data.path=train.txt.gz --set train.epochs=3 (repeatable)")


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("-o", "--out", type=click.Path(), default=None, help="run folder (default: runs/<recipe name>)")
@click.option("--overwrite", is_flag=True, help="start from scratch instead of reusing finished steps (the old run "
              "is replaced only once the new one completes)")
@SET
@_recipe_help
def run(recipe: str, out: str | None, overwrite: bool, sets: tuple[str, ...]) -> None:
    """Run a recipe (a .toml path or a shipped name) end to end: data, train, compress, export, evaluate, report.

    Finished steps are cached in the run folder by content hash (settings and code), so a re-run (or a
    run after editing one variant) redoes only what changed.
    """
    _run_and_report(recipe, out, overwrite, sets)


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--sweep", multiple=True, help="extra variants: METHOD or METHOD:PARAM=V1,V2 (repeatable), "
                                             "e.g. --sweep hash:ratio=4,16,64 --sweep tt,int8:tt_rank=8,16")
@click.option("-o", "--out", type=click.Path(), default=None, help="run folder (default: runs/<recipe name>)")
@click.option("--overwrite", is_flag=True, help="start from scratch instead of reusing finished steps")
@SET
@click.option("--baseline", type=click.Path(dir_okay=False), default=None, help="summary.json of an earlier run")
@click.option("--fail-on-regression", is_flag=True, help="exit 1 unless every check against --baseline is ok "
              "(a regression, a missing measurement or one too noisy to decide all fail)")
@click.option("--save-baseline", type=click.Path(dir_okay=False), default=None, help="also copy summary.json here")
@click.option("--max-metric-drop", type=float, default=None,
              help="gate: allowed drop of the primary metric, AUC for DLRM (rise, for one better lower such as MSE; "
                   "default: recipe [gate] or 0.002)")
@click.option("--max-bytes-growth", type=float, default=None, help="gate: allowed embedding-bytes ratio (default 1.01)")
@click.option("--max-latency-growth", type=float, default=None,
              help="gate: allowed growth of latency-÷-baseline ratios (default 1.5)")
@_recipe_help
def bench(recipe: str, sweep: tuple[str, ...], out: str | None, overwrite: bool, sets: tuple[str, ...],
          baseline: str | None, fail_on_regression: bool, save_baseline: str | None, max_metric_drop: float | None,
          max_bytes_growth: float | None, max_latency_growth: float | None) -> None:
    """Sweep methods x settings x targets of a recipe; JSONL/CSV results, Markdown/HTML report, Pareto plots,
    and an optional regression gate against a baseline run."""
    from .gate import Tolerances, compare, diff_table, read_summary
    from .outputs import check_output, write_json
    if fail_on_regression and not baseline:
        raise UserError("--fail-on-regression needs --baseline", "pass the summary.json of a trusted run")
    base = read_summary(baseline) if baseline else None
    if save_baseline:
        check_output(save_baseline, kind="file", inputs=[baseline])
    from .recipe import load_recipe
    g = load_recipe(recipe, sets).get("gate", {})  # a recipe with parts gates with its own [gate] table
    tol = Tolerances.resolve({"metric_drop": max_metric_drop, "bytes_growth": max_bytes_growth,
                              "latency_growth": max_latency_growth}, g)
    summary, folder, _ = _run_and_report(recipe, out, overwrite, sets, sweep, (baseline, save_baseline))
    if save_baseline:
        write_json(summary, save_baseline, "summary", inputs=[baseline])
    if base is None:
        return
    from .data import open_dataset
    from .gate import studies
    labels = {}
    for name, s in studies(summary).items():
        ds = open_dataset(folder / s["data"])
        labels[name] = ds.arrays("test")[2] if ds.kind == "ctr" else None
    checks = compare(summary, base, tol, labels)
    echo_table(diff_table(checks))
    bad = [c for c in checks if not c["ok"]]
    write_json({"tolerances": tol.__dict__, "checks": checks}, folder / "gate.json", "gate", owner=folder)
    if bad:
        states = {s: sum(c["state"] == s for c in bad) for s in ("regression", "missing", "unchecked")}
        click.echo(f"GATE FAILED: {len(bad)} of {len(checks)} checks not ok ("
                   + ", ".join(f"{n} {s}" for s, n in states.items() if n) + f"; details: {folder / 'gate.json'})",
                   err=True)
        click.echo("  the intervals cover test-row noise only: a change meant to alter training (its random draws "
                   "included) moves trained variants, so re-save the baseline with --save-baseline PATH", err=True)
        if fail_on_regression:
            sys.exit(1)
    else:
        click.echo(f"gate passed: all {len(checks)} checks within tolerance")
