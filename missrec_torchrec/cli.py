"""`missrec`: the command line of missrec-torchrec.

Every sub-command reports bad input as one line naming the file and row or key, exits non-zero and
leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from datapipes.schema import DataError
from missrec_torchrec.config import ConfigError
from missrec_torchrec.known_warnings import quiet_known_warnings


def _add_prepare(sub) -> None:
    from datapipes.sources import SOURCES, source_module

    p = sub.add_parser(
        "prepare",
        help="build a canonical Parquet dataset from a source",
        description="Build a canonical Parquet dataset (users, items, features, stats.json) from SOURCE.",
    )
    srcs = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name in SOURCES:
        module = source_module(name)
        text = getattr(module, "HELPS", {}).get(name, module.HELP)  # one module may serve several names
        sp = srcs.add_parser(name, help=text, description=text)
        sp.add_argument("--out", required=True, type=Path, help="output dataset folder (created atomically)")
        sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        module.add_arguments(sp)
    p.set_defaults(run=_prepare)


def _add_features(sub) -> None:
    from datapipes import features

    p = sub.add_parser("features", help=features.HELP, description=features.HELP)
    p.add_argument("dataset", type=Path, help="prepared dataset folder")
    features.add_arguments(p)
    p.set_defaults(run=_features)


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a prepared dataset's statistics",
        description="Print a prepared dataset's stats.json, feature tables and a few example rows.",
    )
    p.add_argument("dataset", type=Path, help="prepared dataset folder")
    p.add_argument("--rows", type=int, default=3, help="example user rows to print (default 3)")
    p.add_argument("--json", action="store_true", help="print stats.json only, as JSON")
    p.set_defaults(run=_inspect)


def _inspect(args) -> None:
    from missrec_torchrec.inspect_dataset import print_dataset

    print_dataset(args.dataset, args.rows, args.json)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train MISSRec (single process, torchrun or TorchX)",
        description="Train MISSRec under DistributedModelParallel. Overrides are section.key=value "
        "(see configs/defaults.yaml for every key), e.g. train.epochs=3 model.use_id=true.",
    )
    p.add_argument("--config", default="ml100k", help="preset name in configs/ or a YAML path (default ml100k)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model, print the sharding plan and parameter counts, and exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest checkpoint of checkpoint.run_dir (set it with checkpoint.run_dir=DIR), "
                   "with the same --config and overrides as the run: a setting that differs from the run "
                   "folder's config.yaml is refused unless --allow-change names it")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY[,KEY]",
                   help="with --resume: config keys that may differ from the run's config.yaml, e.g. "
                   "train.epochs (repeatable; adds to checkpoint.allow_change)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(run=_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint with full ranking",
        description="Reload a checkpoint (a run folder, its checkpoints/ folder or one step_N folder; "
        "the best one by default) and evaluate a split with full ranking over the catalogue.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="run folder or checkpoint folder")
    p.add_argument("--split", default="test", choices=["valid", "test"], help="split to evaluate (default test)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (e.g. eval.mask_history=true)")
    p.set_defaults(run=_evaluate)


def _prepare(args) -> None:
    from datapipes import sources

    print(sources.summary(args.out, sources.prepare_parsed(args.source, args)))


def _features(args) -> None:
    from datapipes import features

    result = features.compute_features(args.dataset, args.modality, args.encoder, **features.options_of(args))
    print(features.summary(result))


def _add_export_unisrec(sub) -> None:
    p = sub.add_parser(
        "export-atomic",
        help="write a prepared dataset in the MISSRec/UniSRec atomic format",
        description="Write a prepared dataset as NAME.train/valid/test.inter plus NAME.feat1CLS (text), "
        ".feat3CLS (image) and .feat2CLS (text_aug) float32 matrices, as the reference code reads them.",
    )
    p.add_argument("dataset", type=Path, help="prepared dataset folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    p.add_argument("--name", required=True, help="file name stem NAME of the atomic files")
    p.add_argument("--pretrain", action=argparse.BooleanOptionalAction, default=None,
                   help="write the multi-domain pre-training layout (default: when the dataset has several domains)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_export_unisrec)


def _export_unisrec(args) -> None:
    from datapipes.sources.unisrec_export import write_unisrec

    out = write_unisrec(args.dataset, args.out, args.name, pretrain=args.pretrain, overwrite=args.overwrite)
    print(f"wrote {out}")


def _train(args) -> None:
    from missrec_torchrec import trainer
    from missrec_torchrec.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("checkpoint.resume=true")
    cfg = load_config(args.config, overrides)
    cfg.checkpoint.allow_change += [k.strip() for given in args.allow_change for k in given.split(",") if k.strip()]
    if args.resume and not cfg.checkpoint.run_dir:
        raise ConfigError("--resume needs checkpoint.run_dir=DIR (the run folder to continue)")
    if args.dry_run:
        trainer.dry_run(cfg, args.world_size)
    else:
        _check_features(cfg)
        _announce_run_dir(cfg)
        trainer.train(cfg)


def _announce_run_dir(cfg) -> None:
    """Fix the run folder's name (rank 0's, for every rank), refuse it if it cannot be written, and
    print it before anything else."""
    from datapipes.io import check_writable
    from missrec_torchrec.distributed import init_distributed
    from missrec_torchrec.session import broadcast, log0
    from missrec_torchrec.trainer import run_name

    init_distributed()  # the trainer joins the same process group
    c = cfg.checkpoint
    if not c.run_dir:
        c.run_dir = broadcast(str(Path(cfg.experiment.out_dir) / run_name(cfg)))
    check_writable(c.run_dir, c.run_dir)
    log0(f"run folder {c.run_dir}")


def _check_features(cfg) -> None:
    """Refuse a bad feature table of an existing dataset before the trainer creates its run folder
    (`session.check_features`: each rank its own rows, one row group at a time)."""
    from missrec_torchrec.session import check_features

    check_features(cfg)


def _evaluate(args) -> None:
    from missrec_torchrec.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.split, args.overrides)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="top-K recommendations for every user of a split, to Parquet (offline batch scoring)",
        description="Score the whole catalogue for every user with a trained checkpoint (exact dynamic "
        "fusion, in item chunks) and write each user's top-K items to one Parquet file (user_index, "
        "user_key, items, item_keys, scores; scores are fused cosines, before the temperature). Runs in "
        "one process, under torchrun or TorchX (components/score.py); a killed run continues with --resume.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="run folder (its best checkpoint, else the latest), its checkpoints/ folder or a "
                   "step_N folder")
    p.add_argument("--out", required=True, type=Path,
                   help="Parquet file to write (atomically; ranks stage their parts in OUT.parts/)")
    p.add_argument("--split", default="test", choices=["test", "valid", "all"],
                   help="which history: test = the items before the test target (leave-one-out: all but "
                   "the last), valid = before the validation target, all = the whole sequence, to "
                   "recommend the next item (default test)")
    p.add_argument("--topk", type=_positive, default=100, help="items per user (default 100)")
    p.add_argument("--mask-history", action="store_true",
                   help="never recommend an item of the user's history (the whole history before the split's target)")
    p.add_argument("--chunk-items", type=_positive, default=8192,
                   help="items looked up, adapted and scored at once (each rank scans only its own items, one "
                   "chunk held at a time; eval.block_users sets the users per rank scored together) (default 8192)")
    p.add_argument("--approx", type=_positive, default=None, metavar="PER_TABLE_K",
                   help="approximate mode: retrieve each modality's (and the ID table's) PER_TABLE_K nearest "
                   "items by cosine, re-score their union exactly; reports the users provably exact")
    p.add_argument("--ann", choices=["hnsw", "ivf"], default=None,
                   help="ANN mode: a faiss index (HNSW graph or IVF lists) per modality and ID table over the unit "
                   "item vectors, built once per run; each table retrieves its C nearest items by cosine, their "
                   "union is re-scored exactly (scores exact, the item set approximate; no certificate)")
    p.add_argument("--ann-candidates", type=int, default=None, metavar="MULT",
                   help="with --ann: C = MULT x TOPK candidates per table (default 8)")
    p.add_argument("--ann-bits", type=int, default=None, metavar="B",
                   help="with --ann: bits per dimension of the indexes' codes, 4, 6 or 8 (default 8; fewer: a "
                   "smaller index, coarser candidates, scores still exact)")
    p.add_argument("--hnsw-m", type=int, default=None, metavar="M",
                   help="with --ann hnsw: graph links per item (default 32; more: better recall, slower build)")
    p.add_argument("--hnsw-ef", type=int, default=None, metavar="EF",
                   help="with --ann hnsw: search breadth efSearch, never below C (default C)")
    p.add_argument("--ivf-lists", type=int, default=None, metavar="L",
                   help="with --ann ivf: k-means lists (default sqrt(items), at most items / 39)")
    p.add_argument("--ivf-probe", type=int, default=None, metavar="P",
                   help="with --ann ivf: lists scanned per user, nprobe (default 16, at most the lists)")
    p.add_argument("--recall-sample", type=int, default=0, metavar="N",
                   help="with --approx or --ann: also score about N users exactly and report recall@K "
                   "(default 0 = off)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="users per rank per batch (default: the run's data.eval_batch_size)")
    p.add_argument("--commit-every", type=_positive, default=1,
                   help="batches per committed part file: the most work a crash can lose (default 1)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.parts/")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (and discard OUT.parts/ "
                   "unless --resume)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides on the run's config.yaml (e.g. log.progress=false)")
    p.set_defaults(run=_score)


def _score(args) -> None:
    from missrec_torchrec import scoring

    scoring.score(scoring.ScoreOptions.from_args(args))


def _add_export_items(sub) -> None:
    p = sub.add_parser(
        "export-items",
        help="write a checkpoint's item vectors to Parquet for serving",
        description="Write each modality's adapted item vectors (and the ID vectors of a transductive "
        "model) as DIR/<table>.parquet (item_index, item_key, vector fixed_size_list<float32>, present), "
        "plus DIR/export.json with the fusion weights and the scoring formula. DIR is created atomically.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="run folder (its best checkpoint, else the latest), its checkpoints/ folder or a "
                   "step_N folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides on the run's config.yaml")
    p.set_defaults(run=_export_items)


def _export_items(args) -> None:
    from missrec_torchrec.export import export_items

    export_items(args.checkpoint, args.out, args.overwrite, args.overrides)


def _add_baselines(sub) -> None:
    from missrec_torchrec import baselines  # its flags and code live there

    p = sub.add_parser("baselines", help=baselines.HELP, description=baselines.__doc__.split("\n\n")[0])
    baselines.add_arguments(p)
    p.set_defaults(run=baselines.run)


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="training curves of runs as one PNG",
        description="Read each run folder's TensorBoard scalars and draw one panel per --tag with one line "
        "per run (default tags: train/loss per step, valid/ndcg@10 per epoch). Needs matplotlib "
        "(pip install -e '.[plots]').",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with a tb/ folder)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write (replaced atomically)")
    p.add_argument("--label", action="append", help="legend label per run, in order (default: folder names)")
    p.add_argument("--tag", action="append", help="scalar tag per panel, repeatable (default: train/loss, valid/ndcg@10)")
    p.add_argument("--title", help="figure title")
    p.set_defaults(run=_plot)


def _plot(args) -> None:
    from missrec_torchrec import plots

    plots.plot_runs(args.runs, args.out, args.label, args.tag or plots.DEFAULT_TAGS, args.title)
    print(f"wrote {args.out}")


def _add_summarize(sub) -> None:
    p = sub.add_parser(
        "summarize",
        help="test metrics of finished runs as a Markdown table (mean ± std over seeds)",
        description="Read each run folder's results.json and print one Markdown row per --group (runs "
        "sharing a group, e.g. the same model with different seeds, become mean ± sample std).",
    )
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (each with results.json)")
    p.add_argument("--group", action="append", help="row label per run, in order (default: folder names)")
    p.add_argument("--metric", action="append", help="test metric per column, repeatable (default: hr/ndcg@10, @50)")
    p.add_argument("--row", action="append", default=[], metavar="LABEL:METRIC=VALUE,...",
                   help="a fixed row after the runs, e.g. a baseline or a published number (repeatable)")
    p.add_argument("--bars", type=Path, metavar="PNG",
                   help="also draw the table as a bar chart: mean per row, sample std and each run (needs matplotlib)")
    p.add_argument("--title", help="bar chart title")
    p.set_defaults(run=_summarize)


def _summarize(args) -> None:
    from missrec_torchrec import report

    metrics = args.metric or report.DEFAULT_METRICS
    rows = report.rows_of(args.runs, args.group, metrics, args.row)
    print(report.table(rows, metrics))
    if args.bars:
        from missrec_torchrec import plots

        plots.plot_bars(rows, metrics, args.bars, args.title)
        print(f"wrote {args.bars}")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line, like every other error (the usage is in --help).
    Sub-command parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="missrec",
        description="MISSRec multi-modal sequential recommendation on TorchRec.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_prepare(sub)
    _add_features(sub)
    _add_inspect(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export_unisrec(sub)
    _add_score(sub)
    _add_export_items(sub)
    _add_plot(sub)
    _add_summarize(sub)
    _add_baselines(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """argparse, except that KEY=VALUE overrides may also follow a flag (`a=1 --resume b=2`): plain
    argparse takes one run of positionals only. Their order is kept."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    quiet_known_warnings()
    parser = build_parser()
    args = parse(parser, argv)
    try:
        args.run(args)
    except (DataError, ConfigError) as e:
        print(f"missrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    # gloo threads left to interpreter exit can abort a finished rank (SIGABRT, pytorch/pytorch#190489; seen
    # once in CI after `score --ann` wrote its output). Only on success: a failed rank may sit in a collective.
    if (dist := sys.modules.get("torch.distributed")) is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
