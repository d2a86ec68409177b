"""Bad configuration values: refused before anything is prepared or written, with exit code 2 and one
line naming the key (unknown keys are covered in test_cli_train.py)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from missrec_torchrec.cli import main
from missrec_torchrec.config import ConfigError, load_config, section_types
from missrec_torchrec.config_checks import RULES

BAD = [
    # (overrides, key named in the error, fragment of the error)
    (["data.batch_size=0"], "data.batch_size", "positive integer, got 0"),
    (["data.batch_size=-1"], "data.batch_size", "got -1"),
    (["data.batch_size=abc"], "data.batch_size", "got 'abc'"),
    (["data.batch_size=1.5"], "data.batch_size", "got 1.5"),
    (["data.batch_size=true"], "data.batch_size", "got True"),
    (["data.eval_batch_size=0"], "data.eval_batch_size", "positive integer"),
    (["data.num_workers=-2"], "data.num_workers", "non-negative integer"),
    (["data.prefix_sample=0"], "data.prefix_sample", "(0, 1]"),
    (["data.modalities=text"], "data.modalities", "list"),
    (["data.length_buckets=maybe"], "data.length_buckets", "true or false"),
    (["train.lr=-1"], "train.lr", "> 0, got -1"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.lr=fast"], "train.lr", "got 'fast'"),
    (["train.lr=.nan"], "train.lr", "got nan"),
    (["train.epochs=two"], "train.epochs", "non-negative integer, got 'two'"),
    (["train.epochs=-1"], "train.epochs", "got -1"),
    (["train.mode=finetuning"], "train.mode", "finetune, pretrain"),
    (["train.loss=bpr"], "train.loss", "full_softmax, sampled_softmax"),
    (["train.sparse_optimizer=adam"], "train.sparse_optimizer", "rowwise_adagrad"),
    (["train.sharding=diagonal"], "train.sharding", "table_wise, row_wise, column_wise"),
    (["train.sharding={text: diagonal}"], "train.sharding", "mapping"),
    (["train.num_negatives=0"], "train.num_negatives", "positive integer"),
    (["train.max_steps_per_epoch=0"], "train.max_steps_per_epoch", "positive integer or null"),
    (["model.dropout=1.5"], "model.dropout", "[0, 1), got 1.5"),
    (["model.dropout=1"], "model.dropout", "[0, 1)"),
    (["model.dropout=-0.1"], "model.dropout", "[0, 1)"),
    (["model.attention_dropout=1.5"], "model.attention_dropout", "[0, 1) or null, got 1.5"),
    (["model.hidden=30", "model.heads=4"], "model.hidden", "not divisible by model.heads 4"),
    (["model.heads=0"], "model.heads", "positive integer"),
    (["model.temperature=0"], "model.temperature", "> 0"),
    (["model.interest_ratio=0"], "model.interest_ratio", "(0, 1]"),
    (["model.fusion=mean"], "model.fusion", "dynamic_shared"),
    (["model.use_id=maybe"], "model.use_id", "true or false"),
    (["model.kmeans_single_pass=2"], "model.kmeans_single_pass", "true or false"),
    (["eval.metric=ndcg@20"], "eval.metric", "'ndcg@20' is not one of the metrics eval.ks [10, 50]"),
    (["eval.metric=recall@10"], "eval.metric", "hr@10, ndcg@10"),
    (["eval.metric=cold/ndcg@10"], "eval.metric", "cold/ndcg@10"),
    (["eval.ks=[]"], "eval.ks", "non-empty list"),
    (["eval.ks=[0, 10]"], "eval.ks", "positive integer"),
    (["eval.patience=0"], "eval.patience", "positive integer"),
    (["checkpoint.keep=0"], "checkpoint.keep", "positive integer"),
    (["checkpoint.every_steps=-5"], "checkpoint.every_steps", "non-negative integer"),
    (["log.every=0"], "log.every", "positive integer"),
    (["experiment.seed=x"], "experiment.seed", "non-negative integer"),
]


@pytest.mark.parametrize("overrides,key,fragment", BAD, ids=[" ".join(o) for o, _, _ in BAD])
@pytest.mark.parametrize("command", ["train", "train --dry-run"])
def test_bad_value_is_one_line_naming_the_key_and_writes_nothing(tmp_path, monkeypatch, capsys, command,
                                                                 overrides, key, fragment):
    monkeypatch.chdir(tmp_path)  # the defaults' relative runs/ and data/ folders would land here
    argv = [*command.split(), "--config", "ml100k", *overrides]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert f"config key {key}" in captured.err and fragment in captured.err, captured.err
    assert captured.out == ""
    assert os.listdir(tmp_path) == []  # no run folder, no dataset prepared


def test_good_values_are_accepted_and_normalised():
    cfg = load_config("ml100k", ["train.lr=1e-3", "train.sharding=row_wise", "eval.metric=mrr", "model.dropout=0"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    cfg = load_config("ml100k", ["eval.cold_start=true", "eval.metric=cold/ndcg@50", "eval.ks=[5, 50]",
                                 "train.sharding={text: table_wise}", "model.hidden=32", "model.heads=4"])
    assert cfg.eval.metric == "cold/ndcg@50"
    assert load_config("ml100k", ["model.attention_dropout=0"]).model.attention_dropout == 0.0
    assert load_config("ml100k", ["model.attention_dropout=null"]).model.attention_dropout is None


def test_every_key_has_a_rule_or_is_a_switch():
    keys = {f"{s}.{f.name}": f.type for s, kind in section_types().items() for f in dataclasses.fields(kind)}
    assert set(RULES) <= set(keys)
    assert {k: t for k, t in keys.items() if k not in RULES and t != "bool"} == {}
    with pytest.raises(ConfigError, match="config key model.fast_dropout: must be true or false, got 1"):
        load_config("ml100k", ["model.fast_dropout=1"])  # a switch without a rule of its own


def test_allowed_names_match_the_code_that_uses_them():
    from missrec_torchrec.distributed import FUSED_OPTIMIZERS, SHARDING_TYPES
    from missrec_torchrec.model.config import ACTIVATIONS, ATTENTION_KERNELS, FUSIONS
    from missrec_torchrec.precision import PRECISIONS

    for key, names in [("train.sharding", SHARDING_TYPES), ("train.sparse_optimizer", tuple(FUSED_OPTIMIZERS)),
                       ("model.fusion", FUSIONS), ("model.activation", ACTIVATIONS),
                       ("train.precision", PRECISIONS), ("model.attention", ATTENTION_KERNELS)]:
        assert RULES[key][0].startswith(f"one of {', '.join(names)}"), key
