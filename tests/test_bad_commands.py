"""Bad input to every command, table-driven: exit code 2, one line on stderr naming the culprit, no
traceback, and the file system unchanged (the inputs, the trained run, the working directory).

Sources' file contents are covered case by case in test_bad_input.py, config values in
test_bad_config.py, feature tables in test_bad_features.py, output folders in test_overwrite.py and
damaged checkpoints in test_checkpoint_faults.py; this table adds what those do not reach: unwritable
outputs, a checkpoint that does not match its dataset, command-line mistakes and missing inputs of
every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from missrec_torchrec.cli import main
from test_bad_input import write_unisrec_folder
from test_train import REPO, small_overrides

QUIET = ["log.progress=false"]


@pytest.fixture(scope="module")
def w(synthetic_mm, synthetic_other, tmp_path_factory):
    """The inputs every case starts from: datasets (120 items; 90 items; 24-d text), a trained run, a
    log, an atomic folder, a plain file and a folder that is not a dataset."""
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import train

    root = tmp_path_factory.mktemp("bad-commands")
    (root / "work").mkdir()
    narrow = root / "narrow"
    assert main(["prepare", "synthetic", "--out", str(narrow), "--users", "60", "--items", "40", "--modalities",
                 "text:24,image:16", "--mean-len", "8", "--topics", "4", "--seed", "5"]) == 0
    run_args = small_overrides(synthetic_mm, root, **{"train.epochs": 1, "checkpoint.run_dir": root / "run",
                                                      "log.tensorboard": "false", "log.fingerprint": "false"})
    train(load_config("ml100k", run_args))
    log = root / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(6) for k in range(4)))
    write_unisrec_folder(root / "Toy")
    (root / "plain.txt").write_text("keep me\n")
    (root / "notds").mkdir()
    (root / "notds" / "stats.json").write_text("{not json")
    return SimpleNamespace(root=root, ds=synthetic_mm, fewer=synthetic_other, narrow=narrow, run=root / "run",
                           run_args=run_args, log=log, toy=root / "Toy", plain=root / "plain.txt", notds=root / "notds")


def train_argv(w, *extra):
    return ["train", "--config", "ml100k", *small_overrides(w.ds, w.root / "runs", **{"log.tensorboard": "false"}),
            *extra]


READ_ONLY = Path("/proc/sys")  # mounted read-only in containers, even for root
READ_ONLY_CASE = pytest.mark.skipif(os.access(READ_ONLY, os.W_OK), reason=f"{READ_ONLY} is writable here")

CASES = [
    # (id, argv(w), fragments of the one line on stderr[, a mark])
    # -- prepare
    ("prepare: unknown source", lambda w: ["prepare", "nosuch", "--out", "x"], ["invalid choice: 'nosuch'"]),
    ("prepare: no --out", lambda w: ["prepare", "interactions", "--path", w.log], ["required: --out"]),
    ("prepare: missing log", lambda w: ["prepare", "interactions", "--path", w.root / "none.csv", "--out", "x"],
     ["none.csv: no such file"]),
    ("prepare: --k-core -1", lambda w: ["prepare", "interactions", "--path", w.log, "--k-core", "-1", "--out", "x"],
     ["--k-core must be >= 0"]),
    ("prepare: --cold-items 1.5", lambda w: ["prepare", "interactions", "--path", w.log, "--cold-items", "1.5",
                                             "--out", "x"], ["--cold-items must be in [0, 1)"]),
    ("prepare: --k-core abc", lambda w: ["prepare", "movielens-100k", "--k-core", "abc", "--out", "x"],
     ["argument --k-core: invalid int value: 'abc'"]),
    ("prepare: --out inside a file", lambda w: ["prepare", "interactions", "--path", w.log, "--k-core", "0",
                                                "--out", w.plain / "ds"], ["plain.txt/ds: cannot be written", "is a file"]),
    ("prepare synthetic: --out inside a file", lambda w: ["prepare", "synthetic", "--users", "20", "--items", "10",
                                                          "--out", w.plain / "a" / "b"], ["plain.txt is a file"]),
    ("prepare: --out read-only", lambda w: ["prepare", "interactions", "--path", w.log, "--k-core", "0",
                                            "--out", READ_ONLY / "missrec-ds"],
     [f"{READ_ONLY}/missrec-ds: cannot be written: {READ_ONLY} is read-only"], READ_ONLY_CASE),
    ("prepare: --out where no folder can be made", lambda w: ["prepare", "interactions", "--path", w.log, "--k-core",
                                                              "0", "--out", "/sys/missrec-ds"],
     ["/sys/missrec-ds: cannot be written"]),
    ("missrec-atomic: no folder", lambda w: ["prepare", "missrec-atomic", "--out", "x"], ["name the atomic folder"]),
    ("missrec-atomic: two folders", lambda w: ["prepare", "missrec-atomic", w.toy, "--path", w.notds, "--out", "x"],
     ["two folders given"]),
    ("missrec-atomic: not a folder", lambda w: ["prepare", "missrec-atomic", w.root / "nope", "--out", "x"],
     ["nope: not a folder"]),
    ("multi-domain: input not prepared", lambda w: ["prepare", "multi-domain", "--inputs", w.ds, w.root / "nope",
                                                    "--out", "x"], ["nope/stats.json: missing"]),
    # -- features
    ("features: not a dataset", lambda w: ["features", w.root / "nope", "--modality", "t", "--encoder", "minilm"],
     ["nope/stats.json: missing"]),
    ("features: unknown encoder", lambda w: ["features", w.ds, "--modality", "t", "--encoder", "nosuch:x"],
     ["--encoder 'nosuch:x'"]),
    ("features: missing vectors file", lambda w: ["features", w.ds, "--modality", "t", "--encoder",
                                                  f"vectors:{w.root / 'none.npy'}"], ["none.npy: vectors file not found"]),
    ("features: --chunk-size 0", lambda w: ["features", w.ds, "--modality", "t", "--encoder", "minilm",
                                            "--chunk-size", "0"], ["--chunk-size (0)"]),
    # -- inspect
    ("inspect: not a dataset", lambda w: ["inspect", w.root / "nope"], ["nope/stats.json: missing"]),
    ("inspect: stats.json not JSON", lambda w: ["inspect", w.notds], ["notds/stats.json: not valid JSON"]),
    ("inspect: --rows x", lambda w: ["inspect", w.ds, "--rows", "x"], ["argument --rows"]),
    # -- train
    ("train: unknown preset", lambda w: ["train", "--config", "nosuch"], ["config 'nosuch' not found"]),
    ("train: unknown key", lambda w: train_argv(w, "model.nope=1"), ["unknown key 'model.nope'"]),
    ("train: --resume without run_dir", lambda w: train_argv(w, "--resume"), ["--resume needs checkpoint.run_dir"]),
    ("train: an override after a flag is still checked", lambda w: train_argv(w, "--resume", "model.nope=1"),
     ["unknown key 'model.nope'"]),
    ("train: a stray word after a flag", lambda w: train_argv(w, "--resume", "oops"),
     ["unrecognized arguments: oops"]),
    ("inspect: an override where none is taken", lambda w: ["inspect", w.ds, "a=1"],
     ["unrecognized arguments: a=1"]),
    ("train: missing dataset", lambda w: train_argv(w, f"data.dataset={w.root / 'nope'}"),
     ["nope: dataset not found"]),
    ("train: out_dir inside a file", lambda w: train_argv(w, f"experiment.out_dir={w.plain / 'runs'}"),
     ["plain.txt is a file, not a folder"]),
    ("train: run_dir is a file", lambda w: train_argv(w, f"checkpoint.run_dir={w.plain}"),
     ["plain.txt: cannot be written", "plain.txt is a file"]),
    ("train: out_dir read-only", lambda w: train_argv(w, f"experiment.out_dir={READ_ONLY / 'runs'}"),
     [f"{READ_ONLY} is read-only"], READ_ONLY_CASE),
    ("train: --resume with a changed config", lambda w: ["train", "--config", "ml100k", *w.run_args, "train.lr=0.01",
                                                         "data.batch_size=32", "--resume"],
     ["run/config.yaml: --resume with a changed config: data.batch_size 64 -> 32, train.lr 0.003 -> 0.01;",
      "--allow-change data.batch_size,train.lr"]),
    ("train: --resume allowing one of two changes", lambda w: ["train", "--config", "ml100k", *w.run_args,
                                                               "train.lr=0.01", "data.batch_size=32", "--resume",
                                                               "--allow-change", "train.lr"],
     ["changed config: data.batch_size 64 -> 32;"]),
    ("train: --allow-change of an unknown key", lambda w: ["train", "--config", "ml100k", *w.run_args, "--resume",
                                                           "--allow-change", "train.lr,train.nope"],
     ["config key checkpoint.allow_change: unknown key 'train.nope'"]),
    ("train: --resume on another dataset", lambda w: ["train", "--config", "ml100k", *w.run_args,
                                                      f"data.dataset={w.fewer}", "--resume", "--allow-change",
                                                      "data.dataset"],
     ["does not match dataset", "120 items in the checkpoint, 90 in the dataset"]),
    ("train: init_checkpoint missing", lambda w: train_argv(w, f"train.init_checkpoint={w.root / 'nope'}"),
     ["nope: no complete checkpoint there"]),
    ("train: init_checkpoint of another feature dim", lambda w: train_argv(w, f"data.dataset={w.narrow}",
                                                                           f"train.init_checkpoint={w.run}"),
     ["core.pt: checkpoint modalities {'text': 32, 'image': 16} differ from dataset", "narrow's {'text': 24"]),
    ("train: init_checkpoint of another size", lambda w: train_argv(w, f"train.init_checkpoint={w.run}",
                                                                    "model.hidden=64"),
     ["core.pt: core weights do not fit this model (size mismatch for"]),
    # -- evaluate
    ("evaluate: no checkpoint", lambda w: ["evaluate", "--checkpoint", w.root / "nope"],
     ["nope: no complete checkpoint there"]),
    ("evaluate: --split train", lambda w: ["evaluate", "--checkpoint", w.run, "--split", "train"],
     ["argument --split: invalid choice"]),
    ("evaluate: fewer items", lambda w: ["evaluate", "--checkpoint", w.run, f"data.dataset={w.fewer}"],
     ["does not match dataset", "120 items in the checkpoint, 90 in the dataset"]),
    ("evaluate: other feature dim", lambda w: ["evaluate", "--checkpoint", w.run, f"data.dataset={w.narrow}"],
     ["does not match dataset", "'text' features are 32-d in the checkpoint, 24-d in the dataset"]),
    ("evaluate: other model size", lambda w: ["evaluate", "--checkpoint", w.run, "model.hidden=64"],
     ["is [109, 32] in the checkpoint, [109, 64] here"]),
    ("evaluate: other modalities", lambda w: ["evaluate", "--checkpoint", w.run, "data.modalities=[text]"],
     ["modalities ['image', 'text'] in the checkpoint, ['text'] in this run"]),
    ("evaluate: an ID table the run did not train", lambda w: ["evaluate", "--checkpoint", w.run, "model.use_id=true"],
     ["item_id.weight is not in the checkpoint"]),
    # -- export-atomic
    ("export-atomic: not a dataset", lambda w: ["export-atomic", w.notds, "--out", "x", "--name", "A"],
     ["notds/stats.json: not valid JSON"]),
    ("export-atomic: --out inside a file", lambda w: ["export-atomic", w.ds, "--out", w.plain / "x", "--name", "A"],
     ["plain.txt/x: cannot be written", "is a file"]),
    ("export-atomic: --out read-only", lambda w: ["export-atomic", w.ds, "--out", READ_ONLY / "x", "--name", "A"],
     [f"{READ_ONLY} is read-only"], READ_ONLY_CASE),
    ("export-atomic: no --name", lambda w: ["export-atomic", w.ds, "--out", "x"], ["required: --name"]),
    # -- score
    ("score: no checkpoint", lambda w: ["score", "--checkpoint", w.root / "nope", "--out", "s.parquet"],
     ["nope: no such run or checkpoint folder"]),
    ("score: --out inside a file", lambda w: ["score", "--checkpoint", w.run, "--out", w.plain / "s.parquet", *QUIET],
     ["plain.txt/s.parquet: cannot be written", "is a file"]),
    ("score: --out read-only", lambda w: ["score", "--checkpoint", w.run, "--out", READ_ONLY / "s.parquet", *QUIET],
     [f"{READ_ONLY} is read-only"], READ_ONLY_CASE),
    ("score: --out where no folder can be made", lambda w: ["score", "--checkpoint", w.run, "--out",
                                                            "/sys/missrec-s.parquet", *QUIET], ["cannot be written"]),
    ("score: fewer items", lambda w: ["score", "--checkpoint", w.run, "--out", "s.parquet", *QUIET,
                                      f"data.dataset={w.fewer}"], ["120 items in the checkpoint, 90 in the dataset"]),
    ("score: --topk 0", lambda w: ["score", "--checkpoint", w.run, "--out", "s.parquet", "--topk", "0"],
     ["argument --topk: 0 is not >= 1"]),
    ("score: --recall-sample without --approx", lambda w: ["score", "--checkpoint", w.run, "--out", "s.parquet",
                                                           "--recall-sample", "5", *QUIET], ["it needs --approx"]),
    # -- export-items
    ("export-items: no checkpoint", lambda w: ["export-items", "--checkpoint", w.root / "nope", "--out", "e"],
     ["nope: no such run or checkpoint folder"]),
    ("export-items: --out inside a file", lambda w: ["export-items", "--checkpoint", w.run, "--out", w.plain / "e",
                                                     *QUIET], ["plain.txt/e: cannot be written"]),
    ("export-items: other feature dim", lambda w: ["export-items", "--checkpoint", w.run, "--out", "e", *QUIET,
                                                   f"data.dataset={w.narrow}"],
     ["'text' features are 32-d in the checkpoint, 24-d in the dataset"]),
    # -- plot
    ("plot: --out inside a file", lambda w: ["plot", w.run, "--out", w.plain / "p.png"],
     ["plain.txt/p.png: cannot be written", "is a file"]),
    ("plot: --out read-only", lambda w: ["plot", w.run, "--out", READ_ONLY / "p.png"],
     [f"{READ_ONLY} is read-only"], READ_ONLY_CASE),
    ("plot: run without TensorBoard", lambda w: ["plot", w.run, "--out", "p.png"], ["no TensorBoard folder"]),
    # -- summarize
    ("summarize: unfinished run", lambda w: ["summarize", w.root / "nope"], ["nope: no results.json"]),
    ("summarize: unknown metric", lambda w: ["summarize", w.run, "--metric", "hr@200"],
     ["results.json has no test hr@200"]),
    # -- baselines
    ("baselines: not a dataset", lambda w: ["baselines", w.notds], ["notds/stats.json: not valid JSON"]),
    ("baselines: unknown preset", lambda w: ["baselines", "nope"], ["config 'nope' not found"]),
    ("baselines: unknown kNN modality", lambda w: ["baselines", "--knn-modality", "audio", w.ds],
     ["no 'audio' feature table for item-kNN"]),
    ("baselines: --knn-last 0", lambda w: ["baselines", "--knn-last", "0", w.ds], ["--knn-last 0 is not >= 1"]),
    ("baselines: a run of another protocol", lambda w: ["baselines", "--run", w.run, w.ds, "eval.mask_history=true"],
     ["run: evaluated with"]),
    # -- no command
    ("no command", lambda w: [], ["required: COMMAND"]),
]


def snapshot(*roots: Path) -> dict:
    return {str(p): (p.read_bytes() if p.is_file() else None) for root in roots for p in sorted(root.rglob("*"))}


def run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return e.code


@pytest.mark.parametrize("argv,fragments", [pytest.param(*c[1:3], id=c[0], marks=c[3:]) for c in CASES])
def test_bad_command_is_one_line_and_changes_nothing(w, monkeypatch, capsys, argv, fragments):
    monkeypatch.chdir(w.root / "work")  # relative outputs (x, s.parquet, runs/) would land here
    before = snapshot(w.root, w.ds, w.fewer)
    assert run(argv(w)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("missrec"), err
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(w.root, w.ds, w.fewer) == before
    assert not list(Path("/sys").glob("*missrec*"))


def test_read_only_mount_is_one_line_for_every_writer(w, tmp_path):
    """Outputs under a read-only bind mount (a private mount namespace, so nothing outside sees it)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (needs unshare and CAP_SYS_ADMIN)")
    commands = {
        "prepare": ["prepare", "interactions", "--path", str(w.log), "--k-core", "0", "--out", str(ro / "ds")],
        "export-atomic": ["export-atomic", str(w.ds), "--out", str(ro / "atomic"), "--name", "A"],
        "train": train_argv(w, f"experiment.out_dir={ro / 'runs'}"),
        "score": ["score", "--checkpoint", str(w.run), "--out", str(ro / "s.parquet"), *QUIET],
        "export-items": ["export-items", "--checkpoint", str(w.run), "--out", str(ro / "items"), *QUIET],
        "plot": ["plot", str(w.run), "--out", str(ro / "p.png")],
    }
    script = (
        "import contextlib, io, json, sys\n"
        "from missrec_torchrec.cli import main\n"
        "results = {}\n"
        f"for name, argv in {json.dumps({k: [str(a) for a in v] for k, v in commands.items()})}.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    results[name] = [code, err.getvalue()]\n"
        "print(json.dumps(results))\n"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec "$0" -c "$1"',
         sys.executable, script],
        cwd=w.root / "work", env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (code, err) in results.items():
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert f"cannot be written: {ro} is read-only" in err, (name, err)
    assert list(ro.iterdir()) == []


def test_resume_with_an_allowed_change(w, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(w.run, run)
    # Overrides after the flag too (`a=1 --resume b=2`): the later run_dir must win, or w.run is resumed.
    args = ["train", "--config", "ml100k", *w.run_args, "--resume", f"checkpoint.run_dir={run}", "train.epochs=2"]
    assert main(args) == 2  # train.epochs differs from the run's 1
    assert "--allow-change train.epochs" in capsys.readouterr().err
    assert main([*args, "--allow-change", "train.epochs"]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed train.epochs 1 -> 2" in out and "(epoch 1, step" in out, out
    assert "epochs: 2" in (run / "config.yaml").read_text()
    assert json.loads((run / "results.json").read_text())["history"][-1]["epoch"] == 1
