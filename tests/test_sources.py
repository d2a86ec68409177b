"""Dataset sources end to end through `missrec prepare`, on real (bundled MovieLens) and small data.

Expected values are recomputed here with plain Python (csv module, dicts, sorted()) rather than the
vectorised code under test.
"""

from __future__ import annotations

import csv
import filecmp
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapipes.schema import DatasetInfo, read_stats
from datapipes.sources.unisrec_export import write_unisrec
from datapipes.sources.movielens import bundled_folder
from missrec_torchrec.cli import main

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


# ----------------------------------------------------------------------------------------------
# Plain-Python references


def read_inter_plain(path: Path):
    """(user, item, rating, timestamp) rows of a RecBole .inter file, in file order."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(u, i, float(r), int(t)) for u, i, r, t in reader]


def k_core_plain(rows, k):
    """Iterative k-core on (user, item, ...) rows, the UniSRec way: recount until stable."""
    while True:
        users = Counter(r[0] for r in rows)
        items = Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= k and items[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def sequences_plain(rows):
    """user -> item keys sorted by time; Python's sort is stable, so ties keep file order."""
    by_user = defaultdict(list)
    for u, i, _, t in rows:
        by_user[u].append((t, i))
    return {u: [i for _, i in sorted(v, key=lambda x: x[0])] for u, v in by_user.items()}


def read_users(root: Path):
    return pq.read_table(root / "users.parquet").to_pylist()


def read_item_keys(root: Path):
    return pq.read_table(root / "items.parquet", columns=["item_key"])["item_key"].to_pylist()


def prepare(*argv) -> None:
    assert main(["prepare", *map(str, argv)]) == 0


# ----------------------------------------------------------------------------------------------
# MovieLens-100K


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    prepare("movielens-100k", "--out", out, "--rows-per-group", 200)
    rows = read_inter_plain(bundled_folder("movielens-100k") / "ml-100k.inter")
    return out, rows


def test_ml100k_counts_match_plain_k_core(ml100k):
    out, rows = ml100k
    kept = k_core_plain(rows, 5)
    stats = read_stats(out)
    assert stats["interactions_raw"] == len(rows) == 100_000
    assert stats["interactions"] == len(kept)
    assert stats["users"] == len({r[0] for r in kept})
    assert stats["items"] == len({r[1] for r in kept})
    assert stats["training_rows"] == len(kept) - 3 * stats["users"]
    assert stats["filter"] == {"k_core": 5, "min_rating": None}
    assert stats["source"] == "movielens-100k" and stats["domains"] == ["ml-100k"]
    assert pq.ParquetFile(out / "users.parquet").metadata.num_row_groups == -(-stats["users"] // 200)


def test_ml100k_sequences_are_stably_time_sorted(ml100k):
    out, rows = ml100k
    expected = sequences_plain(k_core_plain(rows, 5))
    keys = read_item_keys(out)
    users = read_users(out)
    assert {u["user_key"]: [keys[i] for i in u["items"]] for u in users} == expected
    for u in users:
        assert u["timestamps"] == sorted(u["timestamps"])

    # The tie-break matters: find a user with two items at one timestamp, check file order holds.
    file_pos = {(r[0], r[1]): n for n, r in enumerate(rows)}
    ties = 0
    for u in users:
        ts, items = u["timestamps"], [keys[i] for i in u["items"]]
        for a in range(len(ts) - 1):
            if ts[a] == ts[a + 1]:
                ties += 1
                assert file_pos[(u["user_key"], items[a])] < file_pos[(u["user_key"], items[a + 1])]
    assert ties > 1000


def test_ml100k_leave_one_out_and_item_order(ml100k):
    out, rows = ml100k
    users = read_users(out)
    for u in users:
        n = len(u["items"])
        assert n >= 5 and u["train_end"] == n - 2 and u["valid_end"] == n - 1
    assert [u["user_index"] for u in users] == list(range(len(users)))

    # Dense indices: items and users numbered by first interaction in (timestamp, file row) order.
    kept = sorted(k_core_plain(rows, 5), key=lambda r: r[3])
    assert read_item_keys(out) == list(dict.fromkeys(r[1] for r in kept))
    assert [u["user_key"] for u in users] == list(dict.fromkeys(r[0] for r in kept))


def test_ml100k_item_text(ml100k):
    out, _ = ml100k
    items = pq.read_table(out / "items.parquet").to_pylist()
    text = {r["item_key"]: r["text"] for r in items}
    assert text["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert all(r["text"] and r["domain"] == "ml-100k" for r in items)
    assert [r["item_index"] for r in items] == list(range(len(items)))


def test_ml100k_min_rating_without_k_core(tmp_path, ml100k):
    _, rows = ml100k
    out = tmp_path / "liked"
    prepare("movielens-100k", "--out", out, "--k-core", 0, "--min-rating", 4)
    liked = [r for r in rows if r[2] >= 4]
    per_user = Counter(r[0] for r in liked)
    stats = read_stats(out)
    assert stats["interactions_raw"] == 100_000
    assert stats["interactions"] == sum(n for n in per_user.values() if n >= 3)
    assert stats["users_dropped_short"] == sum(1 for n in per_user.values() if n < 3)
    assert stats["filter"] == {"k_core": 0, "min_rating": 4.0}


def test_ml1m_prepares_all_ratings(tmp_path):
    out = tmp_path / "ml-1m"
    prepare("movielens-1m", "--out", out, "--k-core", 0)
    stats = read_stats(out)
    # docs/protocols.md: all 1,000,209 ratings, 6,040 users, 3,706 rated movies.
    assert stats["interactions_raw"] == stats["interactions"] == 1_000_209
    assert (stats["users"], stats["items"]) == (6040, 3706)
    items = dict(zip(read_item_keys(out), pq.read_table(out / "items.parquet")["text"].to_pylist()))
    assert items["Toy Story (1995)"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert items["Chinatown (1974)"].endswith("Genres: Film-Noir, Mystery, Thriller")


def test_ml100k_cold_item_hold_out(tmp_path, ml100k, capsys):
    _, rows = ml100k
    out = tmp_path / "cold"
    prepare("movielens-100k", "--out", out, "--k-core", 0, "--cold-items", 0.2, "--cold-seed", 3)
    keys = read_item_keys(out)
    got = {u["user_key"]: [keys[i] for i in u["items"]] for u in read_users(out)}
    plain = sequences_plain(rows)
    # No user loses their last (test) item; what is dropped is every other interaction of the cold items.
    assert {u: s[-1] for u, s in got.items()} == {u: plain[u][-1] for u in got}
    dropped = Counter(i for u, s in plain.items() for i in s) - Counter(i for s in got.values() for i in s)
    lasts = Counter(s[-1] for s in got.values())
    cold = set(dropped)
    stats = read_stats(out)
    assert len(cold) <= stats["cold_items"]["items"] == round(0.2 * len({s[-1] for s in plain.values()}))
    assert all(i in lasts and i not in {x for s in got.values() for x in s[:-1]} for i in cold)
    assert stats["interactions"] == 100_000 - sum(dropped.values()) and len(keys) == 1682
    # The users whose test item is held out are exactly the cold-start users the trainer reports.
    warm = DatasetInfo.open(out).training_items()
    cold_users = [u for u, s in got.items() if not warm[keys.index(s[-1])]]
    assert len(cold_users) >= sum(lasts[i] for i in cold) > 100
    # Seeded: the same seed gives the same dataset.
    prepare("movielens-100k", "--out", tmp_path / "again", "--k-core", 0, "--cold-items", 0.2, "--cold-seed", 3)
    assert read_users(tmp_path / "again") == read_users(out)
    assert main(["prepare", "movielens-100k", "--out", str(tmp_path / "bad"), "--cold-items", "1.5"]) == 2
    assert "--cold-items must be in [0, 1)" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------
# Generic interaction logs

LOG = [  # user, item, timestamp; u3 has two interactions only, u1 has a timestamp tie (b before c)
    ("u1", "a", 5), ("u2", "b", 1), ("u1", "b", 7), ("u1", "c", 7), ("u2", "a", 2),
    ("u3", "a", 3), ("u2", "c", 9), ("u1", "d", 1), ("u3", "c", 4), ("u2", "d", 8),
]


def write_log_csv(path: Path) -> None:
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in LOG))


def test_interactions_csv_and_parquet_agree(tmp_path):
    write_log_csv(tmp_path / "log.csv")
    (tmp_path / "text.csv").write_text('item_id,text\na,"Alpha, the first"\nc,Gamma\n')
    prepare("interactions", "--path", tmp_path / "log.csv", "--k-core", 0, "--item-text", tmp_path / "text.csv",
            "--out", tmp_path / "from-csv")

    users = read_users(tmp_path / "from-csv")
    keys = read_item_keys(tmp_path / "from-csv")
    expected = sequences_plain([(u, i, 0, t) for u, i, t in LOG])
    assert {u["user_key"]: [keys[i] for i in u["items"]] for u in users} == {u: expected[u] for u in ("u1", "u2")}
    stats = read_stats(tmp_path / "from-csv")
    assert stats["users_dropped_short"] == 1 and stats["interactions_raw"] == len(LOG)
    assert stats["domains"] == ["log"]
    texts = dict(zip(keys, pq.read_table(tmp_path / "from-csv" / "items.parquet")["text"].to_pylist()))
    assert texts == {"a": "Alpha, the first", "b": None, "c": "Gamma", "d": None}

    # The same log as Parquet with integer user ids and an Arrow timestamp column.
    table = pa.table({
        "uid": pa.array([int(u[1:]) for u, _, _ in LOG]),
        "item": [i for _, i, _ in LOG],
        "when": pa.array([t for _, _, t in LOG], pa.timestamp("s")),
    })
    pq.write_table(table, tmp_path / "log.parquet")
    prepare("interactions", "--path", tmp_path / "log.parquet", "--user-col", "uid", "--item-col", "item",
            "--time-col", "when", "--k-core", 0, "--domain", "shop", "--out", tmp_path / "from-parquet")
    again = read_users(tmp_path / "from-parquet")
    assert [(u["user_key"], u["items"], u["timestamps"]) for u in again] == [
        (u["user_key"][1:], u["items"], u["timestamps"]) for u in users
    ]
    assert read_stats(tmp_path / "from-parquet")["domains"] == ["shop"]


def test_interactions_k_core_is_iterative(tmp_path):
    # One round of 2-core filtering is not enough: dropping item z (one interaction) leaves user w
    # with one interaction, so a second round must drop w as well (a single pass would keep 10).
    rows = [("p", "x", 1), ("p", "y", 2), ("p", "v", 3), ("q", "x", 1), ("q", "y", 2), ("q", "v", 3),
            ("w", "y", 1), ("w", "z", 2), ("r", "x", 1), ("r", "v", 2), ("r", "y", 3)]
    path = tmp_path / "chain.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    prepare("interactions", "--path", path, "--k-core", 2, "--out", tmp_path / "out")
    kept = k_core_plain([(u, i, 0, t) for u, i, t in rows], 2)
    stats = read_stats(tmp_path / "out")
    assert stats["interactions"] == len(kept) == 9 and stats["k_core_rounds"] >= 2
    assert "w" not in {u["user_key"] for u in read_users(tmp_path / "out")}


def test_interactions_exact_duplicates_are_dropped_and_counted(tmp_path, capsys):
    # u1 logs (a, 20) three times and (b, 30) twice; u2's (a, 10) repeats at another time (50), which
    # is a new interaction. Kept, the last duplicate makes u1's test target equal its last history item.
    rows = [("u1", "a", 10), ("u1", "a", 20), ("u2", "a", 10), ("u1", "a", 20), ("u1", "b", 30),
            ("u2", "b", 20), ("u1", "b", 30), ("u2", "a", 50), ("u1", "a", 20), ("u2", "c", 60)]
    path = tmp_path / "dups.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    prepare("interactions", "--path", path, "--k-core", 0, "--out", tmp_path / "dropped")
    stats = read_stats(tmp_path / "dropped")
    assert stats["duplicates"] == "dropped" and stats["duplicates_dropped"] == 3
    assert stats["interactions_raw"] == 10 and stats["interactions"] == 7
    keys = read_item_keys(tmp_path / "dropped")
    sequences = {u["user_key"]: [keys[i] for i in u["items"]] for u in read_users(tmp_path / "dropped")}
    assert sequences == {"u1": ["a", "a", "b"], "u2": ["a", "b", "a", "c"]}
    assert main(["inspect", str(tmp_path / "dropped"), "--rows", "0"]) == 0
    assert "duplicates    3 exact (user, item, timestamp) repeats dropped" in capsys.readouterr().out

    prepare("interactions", "--path", path, "--k-core", 0, "--keep-duplicates", "--out", tmp_path / "kept")
    stats = read_stats(tmp_path / "kept")
    assert stats["duplicates"] == "kept" and stats["duplicates_dropped"] == 0 and stats["interactions"] == 10
    keys = read_item_keys(tmp_path / "kept")
    u1 = next(u for u in read_users(tmp_path / "kept") if u["user_key"] == "u1")
    assert [keys[i] for i in u1["items"]] == ["a", "a", "a", "a", "b", "b"]


# ----------------------------------------------------------------------------------------------
# MISSRec atomic folders


def write_reference_folder(folder: Path, name: str, sequences, user_prefix="", item_prefix=""):
    """An atomic folder written the way UniSRec's convert_to_atomic_files does it."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = lambda items: [f"{item_prefix}{i}" for i in items]  # noqa: E731
    with open(folder / f"{name}.train.inter", "w") as f:
        f.write(HEADER)
        for uid, seq in enumerate(sequences):
            train = tok(seq[:-2])
            for back in range(1, len(train)):
                f.write(f"{user_prefix}{uid}\t{' '.join(train[:-back][-50:])}\t{train[-back]}\n")
    with open(folder / f"{name}.valid.inter", "w") as f:
        f.write(HEADER)
        for uid, seq in enumerate(sequences):
            f.write(f"{user_prefix}{uid}\t{' '.join(tok(seq[:-2])[-50:])}\t{tok(seq)[-2]}\n")
    with open(folder / f"{name}.test.inter", "w") as f:
        f.write(HEADER)
        for uid, seq in enumerate(sequences):
            f.write(f"{user_prefix}{uid}\t{' '.join(tok(seq[:-1])[-50:])}\t{tok(seq)[-1]}\n")


def random_domain(seed: int, n_items: int, lengths, dim: int = 8):
    rng = np.random.default_rng(seed)
    # Items n_items-3.. are never interacted with; they must still become items.
    sequences = [[int(x) for x in rng.integers(0, n_items - 3, size=n)] for n in lengths]
    features = {suffix: rng.normal(size=(n_items, dim)).astype(np.float32) for suffix in ("feat1CLS", "feat3CLS", "feat2CLS")}
    features["feat3CLS"][[2, 5]] = 0  # missing images are zero rows
    return sequences, features


def write_features(folder: Path, stem: str, features) -> None:
    for suffix, matrix in features.items():
        matrix.astype("<f4").tofile(folder / f"{stem}.{suffix}")


def same_files(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="module")
def atomic_domains(tmp_path_factory):
    """Two reference-format downstream folders and their imports."""
    root = tmp_path_factory.mktemp("atomic")
    # Lengths: 3 (no train rows), 52/60/120 (histories truncated to 50), and short ones.
    spec = {"Sci": (0, 40, [3, 5, 60, 4, 120, 7, 52]), "Pan": (1, 20, [4, 9, 55])}
    out = {}
    for name, (seed, n_items, lengths) in spec.items():
        sequences, features = random_domain(seed, n_items, lengths)
        write_reference_folder(root / name, name, sequences)
        write_features(root / name, name, features)
        prepare("missrec-atomic", "--path", root / name, "--feat-dim", 8, "--out", root / f"{name}-ds")
        out[name] = (root / name, root / f"{name}-ds", sequences, features)
    return root, out


def test_atomic_import_rebuilds_full_sequences(atomic_domains):
    _, domains = atomic_domains
    folder, ds, sequences, features = domains["Sci"]
    users = read_users(ds)
    assert [u["items"] for u in users] == sequences
    assert [u["user_key"] for u in users] == [str(i) for i in range(len(sequences))]
    assert all(u["train_end"] == len(u["items"]) - 2 and u["timestamps"] is None for u in users)
    assert read_item_keys(ds) == [str(i) for i in range(40)]

    info = DatasetInfo.open(ds)
    assert info.num_items == 40 and set(info.modalities) == {"text", "image", "text_aug"}
    vectors, present = info.load_features("image")
    np.testing.assert_array_equal(vectors, features["feat3CLS"])
    assert present.sum() == 38 and not present[[2, 5]].any()
    np.testing.assert_array_equal(info.load_features("text_aug")[0], features["feat2CLS"])
    assert info.stats["training_rows"] == sum(len(s) - 3 for s in sequences)


def test_atomic_import_stores_float16_features(atomic_domains, tmp_path):
    _, domains = atomic_domains
    folder, ds, _, features = domains["Sci"]
    prepare("missrec-atomic", "--path", folder, "--feat-dim", 8, "--dtype", "float16", "--out", tmp_path / "half")
    half = DatasetInfo.open(tmp_path / "half")
    assert {m.dtype for m in half.modalities.values()} == {"float16"}
    assert half.feature_rows("image").dtype == np.float16
    np.testing.assert_array_equal(half.load_features("image")[0], features["feat3CLS"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(half.load_features("image")[1], DatasetInfo.open(ds).load_features("image")[1])


def test_atomic_import_streams_train_file_in_blocks(atomic_domains, tmp_path, monkeypatch):
    from datapipes.sources import unisrec_import

    _, domains = atomic_domains
    folder, ds, _, _ = domains["Sci"]
    monkeypatch.setattr(unisrec_import, "TRAIN_BLOCK_BYTES", 512)  # ~4-30 rows per block instead of one block
    assert len(list(unisrec_import.iter_inter(folder / "Sci.train.inter"))) > 20
    prepare("missrec-atomic", "--path", folder, "--feat-dim", 8, "--out", tmp_path / "ds")
    assert read_users(tmp_path / "ds") == read_users(ds)


def test_atomic_round_trip_is_byte_exact(atomic_domains, tmp_path):
    _, domains = atomic_domains
    folder, ds, _, _ = domains["Sci"]
    assert main(["export-atomic", str(ds), "--out", str(tmp_path / "Sci"), "--name", "Sci"]) == 0
    same_files(folder, tmp_path / "Sci")
    # An existing output folder is never overwritten without --overwrite.
    assert main(["export-atomic", str(ds), "--out", str(tmp_path / "Sci"), "--name", "Sci"]) == 2


def test_atomic_reads_shortest_prefix_first_order(atomic_domains, tmp_path):
    _, domains = atomic_domains
    folder, ds, sequences, _ = domains["Sci"]
    # Same folder with each user's train rows reversed (shortest history first).
    lines = (folder / "Sci.train.inter").read_text().splitlines(keepends=True)
    by_user = defaultdict(list)
    for line in lines[1:]:
        by_user[line.split("\t")[0]].append(line)
    (tmp_path / "Sci").mkdir()
    (tmp_path / "Sci" / "Sci.train.inter").write_text(lines[0] + "".join("".join(v[::-1]) for v in by_user.values()))
    for f in os.listdir(folder):
        if not f.endswith("train.inter"):
            (tmp_path / "Sci" / f).write_bytes((folder / f).read_bytes())
    prepare("missrec-atomic", "--path", tmp_path / "Sci", "--feat-dim", 8, "--out", tmp_path / "ds")
    assert [u["items"] for u in read_users(tmp_path / "ds")] == sequences


def test_multi_domain_combine(atomic_domains, tmp_path):
    _, domains = atomic_domains
    sci, pan = domains["Sci"], domains["Pan"]
    out = tmp_path / "SP"
    prepare("multi-domain", "--inputs", sci[1], pan[1], "--rows-per-group", 4, "--out", out)
    info = DatasetInfo.open(out)
    assert info.stats["domains"] == ["Sci", "Pan"] and info.num_items == 60
    assert read_item_keys(out) == [f"0-{i}" for i in range(40)] + [f"1-{i}" for i in range(20)]
    users = read_users(out)
    assert [u["user_key"] for u in users] == [f"0-{i}" for i in range(7)] + [f"1-{i}" for i in range(3)]
    assert [u["items"] for u in users] == sci[2] + [[i + 40 for i in s] for s in pan[2]]
    assert [u["domain"] for u in users] == ["Sci"] * 7 + ["Pan"] * 3
    assert pq.ParquetFile(out / "users.parquet").metadata.num_row_groups == 3
    for modality, suffix in (("text", "feat1CLS"), ("image", "feat3CLS")):
        np.testing.assert_array_equal(info.load_features(modality)[0], np.vstack([sci[3][suffix], pan[3][suffix]]))
    assert info.stats["interactions"] == sum(map(len, sci[2] + pan[2]))


def test_pretrain_folder_round_trip(atomic_domains, tmp_path):
    """combine -> export equals UniSRec's to_pretrain_atomic_files merge; its import equals combine."""
    _, domains = atomic_domains
    reference = tmp_path / "reference"
    reference.mkdir()
    for d, name in enumerate(("Sci", "Pan")):
        _, _, sequences, features = domains[name]
        write_reference_folder(tmp_path / name, name, sequences, user_prefix=f"{d}-", item_prefix=f"{d}-")
        write_features(reference, name, features)  # per-domain feature files sit in the merged folder
    for split in ("train", "valid", "test"):  # to_pretrain_atomic_files: concatenate, one header
        body = "".join((tmp_path / n / f"{n}.{split}.inter").read_text()[len(HEADER):] for n in ("Sci", "Pan"))
        (reference / f"SP.{split}.inter").write_text(HEADER + body)
    (reference / "SP.pt_datasets").write_text("Sci,Pan\n")

    prepare("multi-domain", "--inputs", domains["Sci"][1], domains["Pan"][1], "--out", tmp_path / "combined")
    write_unisrec(tmp_path / "combined", tmp_path / "exported", "SP")
    same_files(reference, tmp_path / "exported")

    prepare("missrec-atomic", "--path", reference, "--name", "SP", "--feat-dim", 8, "--out", tmp_path / "imported")
    assert read_users(tmp_path / "imported") == read_users(tmp_path / "combined")
    assert read_item_keys(tmp_path / "imported") == read_item_keys(tmp_path / "combined")
    write_unisrec(tmp_path / "imported", tmp_path / "again", "SP")
    same_files(reference, tmp_path / "again")
