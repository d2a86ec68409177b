"""Bad input to the dataset sources: exit code != 0, a message naming the file (and row, line or key),
and no --out folder (nor temporary sibling) left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from missrec_torchrec.cli import main

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
DIM = 4
N_ITEMS = 12
SEQUENCES = [[0, 1, 2, 3, 4], [5, 6, 7, 8], [1, 3, 5, 7, 9, 11]]


def expect_error(capsys, out: Path, argv, *fragments) -> str:
    code = main([str(a) for a in argv] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1, err  # one line
    for fragment in fragments:
        assert str(fragment) in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"
    return err


# ----------------------------------------------------------------------------------------------
# interactions


def write_csv(path: Path, rows, header="user_id,item_id,timestamp") -> Path:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


GOOD_ROWS = [(u, i, 10 * u + i) for u in range(3) for i in range(4)]


def test_interactions_non_numeric_timestamp(tmp_path, capsys):
    rows = GOOD_ROWS[:2] + [(0, 2, "yesterday")] + GOOD_ROWS[3:]
    path = write_csv(tmp_path / "log.csv", rows)
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "row 3", "'timestamp'", "yesterday")


def test_interactions_fractional_timestamp(tmp_path, capsys):
    rows = GOOD_ROWS[:4] + [(1, 0, 12.5)] + GOOD_ROWS[5:]
    path = write_csv(tmp_path / "log.csv", rows)
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "row 5", "12.5")


def test_interactions_missing_column(tmp_path, capsys):
    path = write_csv(tmp_path / "log.csv", GOOD_ROWS)
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path, "--time-col", "ts"], path, "'ts'")


def test_interactions_null_user_key_csv(tmp_path, capsys):
    rows = GOOD_ROWS[:6] + [("", 2, 5)] + GOOD_ROWS[7:]
    path = write_csv(tmp_path / "log.csv", rows)
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "row 7", "'user_id'")


def test_interactions_null_item_key_parquet(tmp_path, capsys):
    path = tmp_path / "log.parquet"
    items = [str(i) for _, i, _ in GOOD_ROWS]
    items[8] = None
    pq.write_table(pa.table({"user_id": [u for u, _, _ in GOOD_ROWS], "item_id": items,
                             "timestamp": [t for _, _, t in GOOD_ROWS]}), path)
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "row 9", "'item_id'")


def test_interactions_string_timestamp_parquet(tmp_path, capsys):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": ["5", "noon"]}), path)
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "row 2", "noon")


def test_interactions_empty_file(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_bytes(b"")
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "empty")


def test_interactions_header_only(tmp_path, capsys):
    path = write_csv(tmp_path / "log.csv", [])
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "no data rows")


def test_interactions_truncated_parquet(tmp_path, capsys):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["a"] * 5, "item_id": list("vwxyz"), "timestamp": list(range(5))}), path)
    path.write_bytes(path.read_bytes()[:-20])
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "Parquet")


def test_interactions_corrupt_csv_row(tmp_path, capsys):
    path = write_csv(tmp_path / "log.csv", GOOD_ROWS)
    lines = path.read_text().splitlines()
    lines[3] += ",extra"
    path.write_text("\n".join(lines) + "\n")
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "line 4", "Expected 3 columns")


def test_interactions_duplicate_item_text(tmp_path, capsys):
    log = write_csv(tmp_path / "log.csv", GOOD_ROWS)
    text = write_csv(tmp_path / "text.csv", [(1, "one"), (2, "two"), (1, "uno")], header="item_id,text")
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", log, "--item-text", text],
                 text, "item '1'")


def test_interactions_nothing_survives_k_core(tmp_path, capsys):
    path = write_csv(tmp_path / "log.csv", GOOD_ROWS)  # 3 users x 4 items: no 5-core
    expect_error(capsys, tmp_path / "out", ["prepare", "interactions", "--path", path], path, "5-core")


def test_movielens_min_rating_leaves_nothing(tmp_path, capsys):
    expect_error(capsys, tmp_path / "out", ["prepare", "movielens-100k", "--min-rating", 6], "ml-100k.inter")


# ----------------------------------------------------------------------------------------------
# missrec-atomic


def write_unisrec_folder(folder: Path, name: str = "Toy", sequences=SEQUENCES, features=("feat1CLS", "feat3CLS"),
                        n_items: int = N_ITEMS, dim: int = DIM) -> Path:
    """A small, valid reference-format folder (UniSRec's convert_to_atomic_files layout)."""
    folder.mkdir(parents=True)
    splits = {"train": [], "valid": [], "test": []}
    for uid, seq in enumerate(sequences):
        train = [str(i) for i in seq[:-2]]
        for back in range(1, len(train)):
            splits["train"].append(f"{uid}\t{' '.join(train[:-back][-50:])}\t{train[-back]}\n")
        splits["valid"].append(f"{uid}\t{' '.join(train[-50:])}\t{seq[-2]}\n")
        splits["test"].append(f"{uid}\t{' '.join(map(str, seq[:-1][-50:]))}\t{seq[-1]}\n")
    for split, lines in splits.items():
        (folder / f"{name}.{split}.inter").write_text(HEADER + "".join(lines))
    rng = np.random.default_rng(0)
    for suffix in features:
        rng.normal(size=(n_items, dim)).astype("<f4").tofile(folder / f"{name}.{suffix}")
    return folder


def edit_lines(path: Path, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def unisrec_argv(folder: Path):
    return ["prepare", "missrec-atomic", "--path", folder, "--feat-dim", DIM]


@pytest.fixture
def toy(tmp_path):
    return write_unisrec_folder(tmp_path / "Toy")


def test_unisrec_valid_folder_is_accepted(toy, tmp_path):
    # The baseline every test below breaks in one place.
    assert main([str(a) for a in unisrec_argv(toy)] + ["--out", str(tmp_path / "ok")]) == 0


def test_unisrec_history_item_beyond_features(toy, tmp_path, capsys):
    path = toy / "Toy.train.inter"
    edit_lines(path, lambda ls: ls[:2] + ["0\t0 12\t2\n"] + ls[3:])  # line 3
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 3", "item id 12", "12 feature rows")


def test_unisrec_target_beyond_features(toy, tmp_path, capsys):
    path = toy / "Toy.test.inter"
    edit_lines(path, lambda ls: ls[:2] + ["1\t5 6 7\t99\n"] + ls[3:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 3", "item id 99")


def test_unisrec_non_integer_token(toy, tmp_path, capsys):
    path = toy / "Toy.valid.inter"
    edit_lines(path, lambda ls: ls[:3] + ["2\t1 3 x7 7\t9\n"] + ls[4:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 4", "'x7'")


def test_unisrec_feature_size_not_whole_rows(toy, tmp_path, capsys):
    path = toy / "Toy.feat3CLS"
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "not a whole number")


def test_unisrec_feature_nan_row(toy, tmp_path, capsys):
    path = toy / "Toy.feat1CLS"
    matrix = np.fromfile(path, dtype="<f4").reshape(-1, DIM)
    matrix[4, 1] = np.nan
    matrix.tofile(path)
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "row 4", "NaN")


def test_unisrec_feature_row_counts_differ(toy, tmp_path, capsys):
    np.zeros((N_ITEMS + 1, DIM), "<f4").tofile(toy / "Toy.feat3CLS")
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), toy / "Toy.feat3CLS", "Toy.feat1CLS", "13 rows")


def test_unisrec_missing_image_features(toy, tmp_path, capsys):
    (toy / "Toy.feat3CLS").unlink()
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), toy / "Toy.feat3CLS", "missing")


def test_unisrec_user_in_valid_but_not_train(toy, tmp_path, capsys):
    edit_lines(toy / "Toy.train.inter", lambda ls: [l for l in ls if not l.startswith("2\t")])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), toy / "Toy.valid.inter", "line 4", "user 2", "Toy.train.inter")


def test_unisrec_user_in_train_but_not_valid(toy, tmp_path, capsys):
    edit_lines(toy / "Toy.train.inter", lambda ls: ls[:4] + ["7\t1\t2\n"] + ls[4:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), toy / "Toy.train.inter", "line 5", "user 7")


def test_unisrec_user_in_valid_but_not_test(toy, tmp_path, capsys):
    edit_lines(toy / "Toy.test.inter", lambda ls: ls[:2] + ls[3:])  # drops user 1
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), toy / "Toy.valid.inter", "line 3", "user 1", "Toy.test.inter")


@pytest.mark.parametrize("split", ["valid", "test"])
def test_unisrec_duplicate_user(toy, tmp_path, capsys, split):
    path = toy / f"Toy.{split}.inter"
    edit_lines(path, lambda ls: ls + [ls[1]])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, f"line {len(SEQUENCES) + 2}", "user 0")


def test_unisrec_empty_history(toy, tmp_path, capsys):
    path = toy / "Toy.train.inter"
    edit_lines(path, lambda ls: ls[:3] + ["1\t\t6\n"] + ls[4:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 4", "empty history")


def test_unisrec_malformed_line(toy, tmp_path, capsys):
    path = toy / "Toy.train.inter"
    edit_lines(path, lambda ls: ls[:2] + ["0\t0 1 2\n"] + ls[3:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 3", "Expected 3 columns")


def test_unisrec_history_contradicts_sequence(toy, tmp_path, capsys):
    path = toy / "Toy.train.inter"
    edit_lines(path, lambda ls: ls[:5] + ["2\t1 4\t5\n"] + ls[6:])  # user 2's "1 3" -> "1 4"
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 6", "user 2", "does not match")


def test_unisrec_error_line_counts_across_blocks(tmp_path, capsys, monkeypatch):
    from datapipes.sources import unisrec_import

    monkeypatch.setattr(unisrec_import, "TRAIN_BLOCK_BYTES", 256)  # many small batches
    rng = np.random.default_rng(1)
    folder = write_unisrec_folder(tmp_path / "Toy", sequences=[list(rng.integers(0, N_ITEMS, size=40)) for _ in range(4)])
    path = folder / "Toy.train.inter"
    lines = path.read_text().splitlines(keepends=True)
    user, history, target = lines[120].rstrip("\n").split("\t")
    lines[120] = f"{user}\t{history} 0\t{target}\n"  # one item too many, on line 121
    path.write_text("".join(lines))
    expect_error(capsys, tmp_path / "out", unisrec_argv(folder), path, "line 121", f"user {user}")


def test_unisrec_wrong_header(toy, tmp_path, capsys):
    path = toy / "Toy.valid.inter"
    edit_lines(path, lambda ls: ["user_id:token\titem_id:token\titem_id_list:token_seq\n"] + ls[1:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(toy), path, "line 1", "header")


def test_unisrec_pretrain_domain_index_out_of_range(tmp_path, capsys):
    folder = tmp_path / "PT"
    write_unisrec_folder(folder, name="PT", features=())
    for split in ("train", "valid", "test"):  # make it a one-domain pre-training folder
        edit_lines(folder / f"PT.{split}.inter",
                   lambda ls: ls[:1] + ["\t".join(" ".join(f"0-{t}" for t in f.split(" ")) for f in l.rstrip("\n").split("\t")) + "\n"
                                       for l in ls[1:]])
    (folder / "PT.pt_datasets").write_text("Toy\n")
    rng = np.random.default_rng(0)
    for suffix in ("feat1CLS", "feat3CLS"):
        rng.normal(size=(N_ITEMS, DIM)).astype("<f4").tofile(folder / f"Toy.{suffix}")
    assert main([str(a) for a in unisrec_argv(folder)] + ["--out", str(tmp_path / "ok")]) == 0
    edit_lines(folder / "PT.test.inter", lambda ls: ls[:2] + [ls[2].replace("\t0-8", "\t1-8")] + ls[3:])
    expect_error(capsys, tmp_path / "out", unisrec_argv(folder), folder / "PT.test.inter", "line 3", "domain index 1")


# ----------------------------------------------------------------------------------------------
# multi-domain


def prepared_atomic(tmp_path: Path, name: str, **kwargs) -> Path:
    folder = write_unisrec_folder(tmp_path / "src" / name, name=name, **kwargs)
    out = tmp_path / f"{name}-ds"
    dim = kwargs.get("dim", DIM)
    assert main(["prepare", "missrec-atomic", "--path", str(folder), "--feat-dim", str(dim), "--out", str(out)]) == 0
    return out


def test_combine_input_not_prepared(tmp_path, capsys):
    good = prepared_atomic(tmp_path, "A")
    (tmp_path / "raw").mkdir()
    expect_error(capsys, tmp_path / "out", ["prepare", "multi-domain", "--inputs", good, tmp_path / "raw"],
                 tmp_path / "raw" / "stats.json")


def test_combine_modality_dim_differs(tmp_path, capsys):
    a, b = prepared_atomic(tmp_path, "A"), prepared_atomic(tmp_path, "B", dim=8)
    expect_error(capsys, tmp_path / "out", ["prepare", "multi-domain", "--inputs", a, b], b, "'image'", "dim 8")


def test_combine_modality_missing_in_one_input(tmp_path, capsys):
    a = prepared_atomic(tmp_path, "A", features=("feat1CLS", "feat3CLS", "feat2CLS"))
    b = prepared_atomic(tmp_path, "B")
    expect_error(capsys, tmp_path / "out", ["prepare", "multi-domain", "--inputs", a, b], b, "'text_aug'")


def test_combine_same_domain_twice(tmp_path, capsys):
    a = prepared_atomic(tmp_path, "A")
    expect_error(capsys, tmp_path / "out", ["prepare", "multi-domain", "--inputs", a, a], a, "domain 'A'")
