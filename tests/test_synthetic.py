"""The synthetic source: determinism, chunk-independence, planted structure, missing modalities."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datapipes.schema import DataError, DatasetInfo, read_stats
from datapipes.sources import prepare
from datapipes.sources import synthetic


def make(out: Path, *flags: str) -> dict:
    return prepare("synthetic", out, flags)


SMALL = ("--users", "300", "--items", "400", "--topics", "8", "--mean-len", "12", "--min-len", "3",
         "--modalities", "text:16,image:8", "--rows-per-group", "64")


def tables(root: Path) -> dict:
    names = ["users.parquet", "items.parquet", "features/text.parquet", "features/image.parquet"]
    return {n: pq.read_table(root / n) for n in names if (root / n).exists()}


def item_topics(root: Path) -> np.ndarray:
    texts = pq.read_table(root / "items.parquet").column("text").to_pylist()
    return np.array([int(re.match(r"topic (\d+) item \d+", t).group(1)) for t in texts])


def test_deterministic_for_a_seed_and_independent_of_chunking(tmp_path):
    make(tmp_path / "a", *SMALL, "--seed", "3")
    make(tmp_path / "b", *SMALL, "--seed", "3", "--chunk", "7")  # users and features in many small chunks
    make(tmp_path / "c", *SMALL, "--seed", "4")
    a, b, c = tables(tmp_path / "a"), tables(tmp_path / "b"), tables(tmp_path / "c")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert a[name].equals(b[name]), name
    assert not a["users.parquet"].equals(c["users.parquet"])
    assert read_stats(tmp_path / "a") == read_stats(tmp_path / "b")
    # UsersWriter keeps the requested row groups whatever the generation chunk.
    assert pq.ParquetFile(tmp_path / "b" / "users.parquet").metadata.num_row_groups == 5


def test_counter_based_uniforms_are_addressable():
    whole = synthetic.uniforms(9, 2, 0, 50)
    for start in (1, 3, 4, 13):
        np.testing.assert_array_equal(synthetic.uniforms(9, 2, start, 50 - start), whole[start:])


def test_leave_one_out_layout_and_stats(tmp_path):
    stats = make(tmp_path / "d", "--interactions", "6000", "--mean-len", "10", "--min-len", "4",
                 "--items", "300", "--topics", "5", "--modalities", "", "--seed", "1")
    users = pq.read_table(tmp_path / "d" / "users.parquet").to_pydict()
    n = np.array([len(s) for s in users["items"]])
    assert len(n) == 600 == stats["users"]  # users follow from --interactions / --mean-len
    assert n.min() >= 4 and abs(n.mean() - 10) < 1.0
    np.testing.assert_array_equal(users["train_end"], n - 2)
    np.testing.assert_array_equal(users["valid_end"], n - 1)
    assert users["user_index"] == list(range(600)) and users["user_key"] == [str(i) for i in range(600)]
    flat = np.concatenate(users["items"])
    assert flat.min() >= 0 and flat.max() < 300
    assert stats["interactions"] == n.sum() and stats["training_rows"] == (n - 3).sum()
    assert stats["split"] == "leave-one-out" and stats["domains"] == ["synthetic"] and stats["topics"] == 5
    assert stats["modalities"] == {}
    info = DatasetInfo.open(tmp_path / "d")
    assert info.num_items == 300 and info.num_users == 600
    # One timestamp per item: each user starts at FIRST_TIME, then gaps of 1 s to MAX_GAP.
    gaps = [np.diff(t) for t in users["timestamps"]]
    assert [len(t) for t in users["timestamps"]] == n.tolist()
    assert {t[0] for t in users["timestamps"]} == {synthetic.FIRST_TIME}
    flat_gaps = np.concatenate(gaps)
    assert flat_gaps.min() >= 1 and flat_gaps.max() <= synthetic.MAX_GAP
    assert np.median(flat_gaps) < synthetic.MAX_GAP / 20  # log-uniform: most gaps are short


def test_planted_structure(tmp_path):
    make(tmp_path / "e", *SMALL, "--users", "400", "--stay", "0.7")
    topic = item_topics(tmp_path / "e")
    assert np.bincount(topic, minlength=8).min() == 400 // 8  # balanced, every topic non-empty
    seqs = pq.read_table(tmp_path / "e" / "users.parquet").column("items").to_pylist()
    same = np.concatenate([topic[s][1:] == topic[s][:-1] for s in map(np.array, seqs)])
    freq = np.bincount(topic[np.concatenate(seqs)], minlength=8) / sum(map(len, seqs))
    chance = float((freq**2).sum())  # two independent draws from the interaction topic mix
    assert same.mean() > 0.7 and same.mean() > 3 * chance
    # Users stick to few topics: most of a user's items come from their top 3 topics.
    top3 = [np.sort(np.bincount(topic[s], minlength=8))[-3:].sum() / len(s) for s in seqs]
    assert np.mean(top3) > 0.8
    # Features cluster by topic: same-topic cosine well above different-topic cosine.
    vec, present = DatasetInfo.open(tmp_path / "e").load_features("text")
    v, t = vec[present], topic[present]
    cos = v @ v.T
    same_topic = t[:, None] == t[None, :]
    off_diag = ~np.eye(len(t), dtype=bool)
    assert cos[same_topic & off_diag].mean() > cos[~same_topic].mean() + 0.3


def test_missing_fraction_and_feature_rows(tmp_path):
    stats = make(tmp_path / "f", *SMALL, "--items", "2000", "--missing", "0.3", "--dtype", "float16")
    info = DatasetInfo.open(tmp_path / "f")
    for name, dim in (("text", 16), ("image", 8)):
        vec, present = info.load_features(name)
        assert vec.shape == (2000, dim)
        assert abs((~present).mean() - 0.3) < 0.05  # binomial sd ~0.01
        assert np.all(vec[~present] == 0)
        np.testing.assert_allclose(np.linalg.norm(vec[present], axis=1), 1.0, atol=2e-3)  # float16
        m = stats["modalities"][name]
        assert m == {"dim": dim, "dtype": "float16", "present": int(present.sum()), "encoder": "synthetic"}
        assert pq.read_schema(info.modalities[name].path).field("vector").type.value_type == "halffloat"
    # Modalities go missing independently.
    _, p_text = info.load_features("text")
    _, p_image = info.load_features("image")
    assert not np.array_equal(p_text, p_image)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--min-len", "2"), "--min-len"),
        (("--users", "5", "--interactions", "100"), "--users and --interactions"),
        (("--modalities", "text:0"), "--modalities"),
        (("--modalities", "text:8,text:4"), "given twice"),
        (("--topics", "50", "--items", "10"), "--topics"),
        (("--missing", "1.5"), "--missing"),
        (("--mean-len", "3", "--min-len", "5"), "--mean-len"),
    ],
)
def test_bad_flags_raise_and_leave_nothing(tmp_path, flags, message):
    if "--users" not in flags:
        flags = ("--users", "10", *flags)
    with pytest.raises(DataError, match=re.escape(message)):
        make(tmp_path / "bad", *flags)
    assert list(tmp_path.iterdir()) == []


def test_prepare_api_options_replace_flags_and_bad_input_is_a_data_error(tmp_path):
    by_flags = make(tmp_path / "flags", *SMALL, "--seed", "3")
    by_option = prepare("synthetic", tmp_path / "option", SMALL, seed=3)
    assert by_option == by_flags
    for a, b in zip(tables(tmp_path / "flags").values(), tables(tmp_path / "option").values()):
        assert a.equals(b)
    with pytest.raises(DataError, match="unknown options \\['no_such'\\]"):
        prepare("synthetic", tmp_path / "x", SMALL, no_such=1)
    with pytest.raises(DataError, match="missrec prepare synthetic: .*--no-such-flag"):
        prepare("synthetic", tmp_path / "y", [*SMALL, "--no-such-flag"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags", "option"]
