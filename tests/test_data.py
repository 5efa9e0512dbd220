"""Tests of data.py on small preference datasets built here: every source kind and schema, labels, ties, identical
pairs, image modes, joint crop/flip, resume order, streaming, and bad rows skipped with DataLoader workers."""

import csv
import io
import json
import logging
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import skip_first_batches
from accelerate.data_loader import prepare_data_loader
from PIL import Image

import data
from data import (
    IDENTICAL,
    BadRowTracker,
    PreferenceDataConfig,
    PreferenceDataset,
    StreamingPreferenceDataset,
    decode_image,
    load_preference_dataset,
    make_dataloader,
    set_loader_epoch,
)

datasets.disable_progress_bars()

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
RES = 16
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def encode(image, fmt="PNG", **save_args):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def solid(color, size=(24, 20)):
    return encode(Image.new("RGB", size, color))


def rgb_of(pixels):
    """Mean colour of a (3, H, W) tensor in [-1, 1], as 0..255 values."""
    return ((pixels.mean(dim=(1, 2)) + 1) * 127.5).round().tolist()


def all_red(pixels):
    return bool(torch.all(pixels[0] > 0.9) and torch.all(pixels[1:] < -0.9))


def config(tmp_path, **overrides):
    return PreferenceDataConfig(**{"resolution": RES, "cache_dir": str(tmp_path / "cache"), **overrides})


def load(tmp_path, source=None, **overrides):
    return load_preference_dataset(config(tmp_path, **overrides), source=source)


def first_batch(dataset, batch_size=16, num_workers=0):
    return next(iter(make_dataloader(dataset, batch_size, num_workers, shuffle=False)))


def one_epoch(dataset, batch_size=4, num_workers=0, epoch=0, shuffle=True, seed=0):
    loader = make_dataloader(dataset, batch_size, num_workers, shuffle=shuffle, seed=seed)
    set_loader_epoch(loader, epoch)
    return list(loader)


def pairs(captions, winners, losers, names=("prompt", "chosen", "rejected")):
    """An in-memory chosen/rejected dataset."""
    return datasets.Dataset.from_dict(dict(zip(names, (list(captions), list(winners), list(losers)))))


def write_pickapic_parquet(path, rows):
    """rows: (caption, jpg_0 bytes, jpg_1 bytes, label_0)."""
    pq.write_table(pa.table(dict(zip(PICKAPIC_COLUMNS, zip(*rows)))), path)
    return str(path)


def write_pickapic_arrow(path, rows):
    """rows as for write_pickapic_parquet, written as an Arrow IPC stream (the datasets cache format)."""
    table = pa.table(dict(zip(PICKAPIC_COLUMNS, zip(*rows))))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def red_wins_pickapic(n=4):
    """Labelled pairs alternating which column holds the red winner."""
    return [
        (f"pair {i}", solid(RED), solid(BLUE), 1.0) if i % 2 == 0 else (f"pair {i}", solid(BLUE), solid(RED), 0.0)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A folder of image files: red and blue PNGs, a corrupt and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "red.png").write_bytes(solid(RED))
    (folder / "blue.png").write_bytes(solid(BLUE))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return folder


# --- sources and schemas -------------------------------------------------------------------------------------------


def test_pickapic_orientation_ties_identical_and_batch_format(tmp_path):
    rows = red_wins_pickapic(2) + [
        ("a tie", solid(RED), solid(BLUE), 0.5),
        ("identical", solid(RED), solid(RED), 1.0),
        ("green loses", solid(RED), solid(GREEN), 1),
    ]
    dataset = load(tmp_path, dataset_name=write_pickapic_parquet(tmp_path / "p.parquet", rows))
    assert dataset.stats == {"rows": 5, "ties_dropped": 1, "bad_labels": 0, "kept": 4}
    batch = first_batch(dataset)
    assert batch["row_ids"].tolist() == [0, 1, 4]
    assert batch["captions"] == ["pair 0", "pair 1", "green loses"]
    assert batch["dropped"] == [(3, IDENTICAL)] and batch["skipped"] == []
    assert batch["pixel_values_w"].shape == batch["pixel_values_l"].shape == (3, 3, RES, RES)
    assert batch["pixel_values_w"].dtype == torch.float32
    assert all(all_red(pixels) for pixels in batch["pixel_values_w"])
    assert [rgb_of(pixels) for pixels in batch["pixel_values_l"]] == [list(BLUE), list(BLUE), list(GREEN)]
    assert batch["original_sizes_w"].tolist() == [[20, 24]] * 3 and batch["original_sizes_w"].dtype == torch.long
    assert batch["crop_top_lefts_w"].tolist() == [[0, 2]] * 3  # 24x20 -> 19x16, centered
    tracker = BadRowTracker(0.05, min_rows=1)
    tracker.update(batch)
    assert tracker.counts == {"pairs": 3, "skipped_unreadable": 0, "dropped_identical images": 1}


def red_blue_pil(n=3):
    return pairs([f"prompt {i}" for i in range(n)], [Image.new("RGB", (24, 20), RED)] * n,
                 [Image.new("RGB", (20, 24), BLUE)] * n)


def write_manifest(folder, fmt, names=("prompt", "chosen", "rejected"), n=3):
    """A jsonl or csv manifest in `folder` whose image paths are relative to it."""
    (folder / "img").mkdir(parents=True)
    records = []
    for i in range(n):
        (folder / "img" / f"w{i}.png").write_bytes(solid(RED))
        (folder / "img" / f"l{i}.png").write_bytes(solid(BLUE))
        records.append(dict(zip(names, (f"prompt {i}", f"img/w{i}.png", f"img/l{i}.png"))))
    path = folder / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        path.write_text("\n".join([",".join(names), *(",".join(record.values()) for record in records)]) + "\n")
    return str(path)


def build_source(kind, tmp_path):
    """(config overrides, source) holding three pairs whose winner is red, in the form `kind` names."""
    if kind == "parquet file":
        return {"dataset_name": write_pickapic_parquet(tmp_path / "p.parquet", red_wins_pickapic(3))}, None
    if kind == "parquet shards, hub layout":
        (tmp_path / "data").mkdir()
        rows = red_wins_pickapic(5)
        write_pickapic_parquet(tmp_path / "data/train-00000-of-00002.parquet", rows[:2])
        write_pickapic_parquet(tmp_path / "data/train-00001-of-00002.parquet", rows[2:3])
        write_pickapic_parquet(tmp_path / "data/test-00000-of-00001.parquet", rows[3:])
        return {"train_data_dir": str(tmp_path)}, None
    if kind == "arrow shards":
        rows = red_wins_pickapic(3)
        write_pickapic_arrow(tmp_path / "part0.arrow", rows[:2])
        write_pickapic_arrow(tmp_path / "part1.arrow", rows[2:])
        return {"dataset_name": str(tmp_path)}, None
    if kind in ("jsonl manifest", "csv manifest"):
        return {"dataset_name": write_manifest(tmp_path / "m", kind.split()[0])}, None
    if kind == "folder of jsonl with winner/loser":
        write_manifest(tmp_path / "m", "jsonl", names=("caption", "winner", "loser"))
        return {"train_data_dir": str(tmp_path / "m")}, None
    if kind == "save_to_disk (Image feature)":
        red_blue_pil().save_to_disk(str(tmp_path / "saved"))
        return {"dataset_name": str(tmp_path / "saved")}, None
    if kind == "save_to_disk DatasetDict":
        datasets.DatasetDict({"train": red_blue_pil(), "test": red_blue_pil(1)}).save_to_disk(str(tmp_path / "dd"))
        return {"dataset_name": str(tmp_path / "dd")}, None
    if kind == "parquet with Image feature":
        red_blue_pil().to_parquet(str(tmp_path / "cr.parquet"))
        return {"dataset_name": str(tmp_path / "cr.parquet")}, None
    if kind == "in-memory PIL images":
        return {}, red_blue_pil()
    if kind == "in-memory bytes":
        return {}, pairs(["a"] * 3, [solid(RED)] * 3, [solid(BLUE)] * 3)
    raise AssertionError(kind)


SOURCE_KINDS = [
    "parquet file",
    "parquet shards, hub layout",
    "arrow shards",
    "jsonl manifest",
    "csv manifest",
    "folder of jsonl with winner/loser",
    "save_to_disk (Image feature)",
    "save_to_disk DatasetDict",
    "parquet with Image feature",
    "in-memory PIL images",
    "in-memory bytes",
]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_kind_and_schema_is_detected(kind, tmp_path):
    overrides, source = build_source(kind, tmp_path)
    dataset = load(tmp_path, source=source, **overrides)
    assert isinstance(dataset, PreferenceDataset) and dataset.stats["kept"] == 3
    batch = first_batch(dataset)
    assert batch["skipped"] == [] and len(batch["captions"]) == 3
    assert all(all_red(pixels) for pixels in batch["pixel_values_w"])
    assert all(rgb_of(pixels) == list(BLUE) for pixels in batch["pixel_values_l"])


@pytest.mark.parametrize("kind", ["parquet shards, hub layout", "jsonl manifest", "save_to_disk (Image feature)"])
def test_streaming_source_kinds(kind, tmp_path):
    overrides, _ = build_source(kind, tmp_path)
    dataset = load(tmp_path, streaming=True, **overrides)
    assert isinstance(dataset, StreamingPreferenceDataset)
    winners = torch.cat([batch["pixel_values_w"] for batch in one_epoch(dataset, batch_size=2, shuffle=False)])
    assert len(winners) == 3 and all(all_red(pixels) for pixels in winners)


def test_column_flags_override_detection(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "a": [solid(BLUE), solid(RED)], "b": [solid(RED), solid(BLUE)],
                             "pref": [0, 1], "caption": ["c", "c"]}), path)
    labelled = load(tmp_path, dataset_name=str(path), caption_column="text", image_0_column="a",
                    image_1_column="b", label_column="pref")
    batch = first_batch(labelled)
    assert batch["captions"] == ["x", "y"] and all(all_red(pixels) for pixels in batch["pixel_values_w"])
    batch = first_batch(load(tmp_path, dataset_name=str(path), winner_column="b", loser_column="a"))
    assert batch["captions"] == ["c", "c"] and all_red(batch["pixel_values_w"][0])


def test_stream_without_declared_features_holding_bytes_and_pil_images(tmp_path):
    def rows():
        yield {"prompt": "bytes", "chosen": solid(RED), "rejected": solid(BLUE)}
        yield {"prompt": "pil", "chosen": Image.new("RGB", (20, 20), RED), "rejected": Image.new("RGB", (20, 20), BLUE)}
        yield {"prompt": "same", "chosen": Image.new("RGB", (20, 20), RED), "rejected": Image.new("RGB", (20, 20), RED)}

    source = datasets.IterableDataset.from_generator(rows)
    assert source.features is None
    batch = first_batch(load(tmp_path, source=source))
    assert batch["captions"] == ["bytes", "pil"] and all(all_red(pixels) for pixels in batch["pixel_values_w"])
    assert batch["dropped"] == [(2, IDENTICAL)]


# --- errors at load time -------------------------------------------------------------------------------------------


def load_error(tmp_path, source=None, **overrides):
    with pytest.raises(ValueError) as error:
        load(tmp_path, source=source, **overrides)
    return str(error.value)


def test_no_schema_error_lists_columns_schemas_and_flags(tmp_path):
    message = load_error(tmp_path, source=datasets.Dataset.from_dict({"text": ["a"], "img": [b"x"]}))
    for expected in ("['text', 'img']", "Pick-a-Pic", "chosen/rejected", "--caption_column", "--winner_column",
                     "--image_0_column", "caption column (--caption_column; tried caption, prompt)"):
        assert expected in message


def test_wrongly_typed_columns_are_named(tmp_path):
    source = datasets.Dataset.from_dict({"caption": [1], "jpg_0": [2.0], "jpg_1": [b"x"], "label_0": ["1"]})
    message = load_error(tmp_path, source=source)
    assert "caption column 'caption' holds Value('int64')" in message
    assert "image column 'jpg_0' holds Value('float64')" in message
    assert "label column 'label_0' holds Value('string')" in message


def test_flag_naming_a_missing_column_and_conflicting_flags(tmp_path):
    source = red_blue_pil(1)
    assert "winner column (--winner_column; tried best)" in load_error(tmp_path, source=source, winner_column="best")
    assert "not both" in load_error(tmp_path, source=source, winner_column="chosen", label_column="label")


def test_bad_label_is_an_error_naming_the_row(tmp_path):
    rows = red_wins_pickapic(3) + [("bad", solid(RED), solid(BLUE), 2.0), ("nan", solid(RED), solid(BLUE), None)]
    message = load_error(tmp_path, dataset_name=write_pickapic_parquet(tmp_path / "p.parquet", rows))
    assert "row 3 holds 2.0" in message and "2 such rows" in message and "[3, 4]" in message


def test_missing_hub_dataset_points_at_the_data_docs(tmp_path, monkeypatch):
    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'yuvalkirstain/pickapic_v2' doesn't exist on the Hub")

    monkeypatch.setattr(data.datasets, "load_dataset", not_found)
    message = load_error(tmp_path, dataset_name="yuvalkirstain/pickapic_v2")
    assert "doesn't exist on the Hub" in message
    assert "yuvalkirstain/pickapic_v2 has been reported unavailable on the hub since 2025" in message
    assert 'docs/data.md ("Preference data")' in message

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    assert "Preference data" in load_error(tmp_path, dataset_name="someone/prefs")


def test_other_source_errors(tmp_path):
    assert "does not exist" in load_error(tmp_path, dataset_name=str(tmp_path / "nowhere"))
    assert "does not exist" in load_error(tmp_path, train_data_dir="prefs_folder_that_is_not_here")
    assert "not both" in load_error(tmp_path, dataset_name=str(tmp_path), train_data_dir=str(tmp_path))
    assert "--dataset_name" in load_error(tmp_path)
    assert "holds URLs" in load_error(tmp_path, source=pairs(["a"], ["https://x/1.png"], ["https://x/2.png"]))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("no data")
    assert "no data files" in load_error(tmp_path, dataset_name=str(folder))
    write_pickapic_parquet(folder / "x.parquet", red_wins_pickapic(1))
    assert "splits found: ['train']" in load_error(tmp_path, dataset_name=str(folder), dataset_split="validation")
    ties = write_pickapic_parquet(tmp_path / "t.parquet", [("tie", solid(RED), solid(BLUE), 0.5)])
    assert "all 1 rows are ties" in load_error(tmp_path, dataset_name=ties)


# --- local folders whose data files disagree: named before any conversion -----------------------------------------


@pytest.fixture
def no_conversion(monkeypatch):
    """Fail a test that lets datasets start converting the data files."""
    def converting(*args, **kwargs):
        raise AssertionError("datasets was asked to convert the data files")

    monkeypatch.setattr(data.datasets, "load_dataset", converting)


def write_data_file(path, columns):
    """Write `columns` ({name: values}) to `path`, in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    else:
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(table.to_pylist())


def pickapic_columns(n=1):
    return dict(zip(PICKAPIC_COLUMNS, zip(*red_wins_pickapic(n))))


def other_columns(n=1):
    return {"caption": ["x"] * n, "image_a": [solid(RED)] * n, "image_b": [solid(BLUE)] * n, "label": [1.0] * n}


def test_shards_with_different_columns_are_named_by_column_set(tmp_path, no_conversion):
    folder = tmp_path / "prefs"
    write_data_file(folder / "part-0.parquet", pickapic_columns())
    write_data_file(folder / "part-1.parquet", pickapic_columns())
    write_data_file(folder / "extra/ab.parquet", other_columns())
    message = load_error(tmp_path, train_data_dir=str(folder))
    assert f"{folder} holds data files with different columns" in message
    assert "\n  - extra/ab.parquet: caption, image_a, image_b, label (no preference schema)" in message
    assert "\n  - part-0.parquet, part-1.parquet: caption, jpg_0, jpg_1, label_0 (preference pairs)" in message
    assert f"(e.g. --dataset_name {folder / 'part-0.parquet'})" in message
    assert "a folder holding only files with the same columns" in message
    flagged = load_error(tmp_path, train_data_dir=str(folder), image_0_column="image_a", image_1_column="image_b",
                         label_column="label")
    assert "ab.parquet: caption, image_a, image_b, label (preference pairs)" in flagged
    assert f"--dataset_name {folder / 'extra/ab.parquet'}" in flagged


def test_different_columns_none_of_them_pairs_shows_the_schemas(tmp_path, no_conversion):
    write_data_file(tmp_path / "d/a.jsonl", {"text": ["t"], "image": ["a.png"]})
    write_data_file(tmp_path / "d/b.jsonl", {"prompt": ["t"], "good": ["a.png"], "bad": ["b.png"]})
    message = load_error(tmp_path, dataset_name=str(tmp_path / "d"))
    assert "a.jsonl: text, image (no preference schema)" in message
    assert "b.jsonl: prompt, good, bad (no preference schema)" in message
    assert "e.g." not in message and "Supported schemas" in message


def path_pairs(folder, n, order):
    """`n` pairs (red wins) whose images are files in `folder`, as columns in the order `order`."""
    (folder / "red.png").write_bytes(solid(RED))
    (folder / "blue.png").write_bytes(solid(BLUE))
    columns = {"prompt": [f"p{i}" for i in range(n)], "chosen": ["red.png"] * n, "rejected": ["blue.png"] * n}
    return {name: columns[name] for name in order}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("extension", [".parquet", ".arrow", ".jsonl", ".csv"])
def test_shards_with_the_same_columns_in_another_order_load(extension, streaming, tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_data_file(folder / f"a{extension}", path_pairs(folder, 2, ("prompt", "chosen", "rejected")))
    write_data_file(folder / f"b{extension}", path_pairs(folder, 1, ("rejected", "prompt", "chosen")))
    dataset = load(tmp_path, dataset_name=str(folder), streaming=streaming)
    batch = first_batch(dataset)
    assert sorted(batch["captions"]) == ["p0", "p0", "p1"] and batch["skipped"] == []
    assert all(all_red(pixels) for pixels in batch["pixel_values_w"])


def test_mixed_formats_are_named_per_format(tmp_path, no_conversion):
    folder = tmp_path / "prefs"
    write_data_file(folder / "a.parquet", pickapic_columns())
    write_data_file(folder / "b.jsonl", {"caption": ["c"], "jpg_0": ["x.png"], "jpg_1": ["y.png"], "label_0": [1]})
    (folder / "c.json").write_text('[{"caption": "c"}]')
    message = load_error(tmp_path, dataset_name=str(folder))
    assert f"{folder} mixes data formats" in message
    assert "\n  - parquet: a.parquet\n" in message and "\n  - json: b.jsonl, c.json\n" in message
    assert "point --dataset_name at one file" in message


@pytest.mark.parametrize("extension, bad_files, reasons", [
    (".parquet", {"empty.parquet": b"", "corrupt.parquet": b"not parquet at all"},
     {"empty.parquet": "empty (0 bytes)", "corrupt.parquet": "Parquet magic bytes not found",
      "no_rows.parquet": "no rows (datasets cannot read a parquet file without rows)"}),
    (".arrow", {"empty.arrow": b"", "corrupt.arrow": b"not arrow at all"},
     {"empty.arrow": "empty (0 bytes)", "corrupt.arrow": "corrupt.arrow: "}),
    (".csv", {"empty.csv": b"", "blank.csv": b"\n\n"},
     {"empty.csv": "empty (0 bytes)", "blank.csv": "no header line"}),
])
def test_empty_and_unreadable_shards_are_named(extension, bad_files, reasons, tmp_path, no_conversion):
    folder = tmp_path / "prefs"
    write_data_file(folder / f"good{extension}", path_pairs(tmp_path, 1, ("prompt", "chosen", "rejected")))
    for name, content in bad_files.items():
        (folder / name).write_bytes(content)
    if extension == ".parquet":
        write_data_file(folder / "no_rows.parquet", {name: [] for name in PICKAPIC_COLUMNS})
    message = load_error(tmp_path, dataset_name=str(folder))
    assert f"datasets cannot read these data files in {folder}:" in message
    for name, reason in reasons.items():
        assert f"\n  - {name}: " in message and reason in message
    assert f"good{extension}" not in message and message.endswith("Delete them from the folder (or write them again).")


def test_a_single_empty_file_is_named(tmp_path, no_conversion):
    (tmp_path / "p.parquet").write_bytes(b"")
    message = load_error(tmp_path, dataset_name=str(tmp_path / "p.parquet"))
    assert f"in {tmp_path}:\n  - p.parquet: empty (0 bytes)" in message


def test_empty_jsonl_beside_good_ones_still_loads(tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_data_file(folder / "a.jsonl", path_pairs(folder, 2, ("prompt", "chosen", "rejected")))
    (folder / "b.jsonl").write_text("")
    assert load(tmp_path, dataset_name=str(folder)).stats["kept"] == 2


def test_folder_without_data_files_names_the_extensions_read(tmp_path, no_conversion):
    folder = tmp_path / "prefs"
    folder.mkdir()
    message = load_error(tmp_path, dataset_name=str(folder))
    assert f"{folder} holds no data files, which end in {', '.join(data.DATA_FORMATS)}" in message
    assert "found: nothing" in message and ".parquet, .arrow, .jsonl, .json, .csv" in message
    (folder / "notes.txt").write_text("no data")
    (folder / "img").mkdir()
    (folder / "img/red.png").write_bytes(solid(RED))
    assert "found: img/red.png, notes.txt." in load_error(tmp_path, train_data_dir=str(folder))


def test_the_trainer_reports_a_bad_data_folder_before_loading_models(tmp_path, monkeypatch, no_conversion):
    import train_inversion_dpo

    def load_models(args):
        raise AssertionError("models were loaded before the data was checked")

    monkeypatch.setattr(train_inversion_dpo, "load_models", load_models)
    write_data_file(tmp_path / "prefs/jpg.parquet", pickapic_columns())
    write_data_file(tmp_path / "prefs/ab.parquet", other_columns())
    args = train_inversion_dpo.parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name",
                                           str(tmp_path / "prefs"), "--output_dir", str(tmp_path / "out"),
                                           "--report_to", "none"])
    with pytest.raises(SystemExit) as error:
        train_inversion_dpo.main(args)
    message = str(error.value)
    assert message.startswith(f"error: {tmp_path / 'prefs'} holds data files with different columns")
    assert "ab.parquet: caption, image_a, image_b, label" in message and "jpg.parquet: caption, jpg_0" in message
    assert "DatasetGenerationError" not in message


# --- images --------------------------------------------------------------------------------------------------------


def test_mode_conversions():
    size = (6, 4)
    rgba = Image.new("RGBA", size, (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    assert decode_image(encode(rgba)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert decode_image(encode(rgba)).getpixel((1, 0)) == RED
    assert decode_image(encode(Image.new("L", size, 77))).getpixel((0, 0)) == (77, 77, 77)
    assert decode_image(encode(Image.new("LA", size, (0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(encode(Image.new("LA", size, (0, 255)))).getpixel((0, 0)) == (0, 0, 0)
    assert decode_image(encode(Image.new("RGB", size, RED).convert("P"))).getpixel((0, 0)) == RED
    palette = Image.new("RGB", size, GREEN).convert("P")
    assert decode_image(encode(palette, transparency=palette.getpixel((0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    sixteen_bit = encode(Image.new("I;16", size, 0x8080))
    assert Image.open(io.BytesIO(sixteen_bit)).mode == "I;16"
    assert decode_image(sixteen_bit).getpixel((0, 0)) == (128, 128, 128)
    cmyk_red = encode(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk_red)).mode == "CMYK"
    assert np.allclose(decode_image(cmyk_red).getpixel((0, 0)), RED, atol=3)


def exif_rotated_jpeg():
    """A 40x20 JPEG, left half red, right half blue, whose EXIF says: rotate 90 degrees clockwise to display."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif)


def test_exif_orientation_and_upscaling_through_the_dataset(tmp_path):
    source = pairs(["rotated", "tiny"], [exif_rotated_jpeg(), solid(RED, (5, 3))], [solid(GREEN)] * 2)
    batch = first_batch(load(tmp_path, source=source, resolution=20, hflip=False))
    assert batch["original_sizes_w"].tolist() == [[40, 20], [3, 5]]  # (height, width) after EXIF transpose
    rotated = batch["pixel_values_w"][0]
    assert all_red(rotated[:, :8]) and torch.all(rotated[2, 12:] > 0.9)  # the red half is on top
    assert batch["pixel_values_w"].shape[-2:] == (20, 20) and all_red(batch["pixel_values_w"][1])


def pattern_pair(size):
    """A winner asymmetric left/right and top/bottom, and its negative as the loser."""
    y, x = np.mgrid[: size[1], : size[0]]
    image = np.stack([x * 255 // size[0], y * 255 // size[1], (x > y * 2) * 255], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(image)), encode(Image.fromarray(255 - image))


def test_winner_and_loser_share_crop_and_flip_deterministically(tmp_path):
    winners, losers = zip(*(pattern_pair((48 + 8 * i, 32)) for i in range(6)))
    dataset = load(tmp_path, source=pairs(["p"] * 6, winners, losers), random_crop=True, seed=3)
    epochs = [one_epoch(dataset, batch_size=6, epoch=epoch)[0] for epoch in (0, 1)]
    for batch in epochs:
        assert torch.allclose(batch["pixel_values_l"], -batch["pixel_values_w"], atol=2.5 / 127.5)
        assert torch.equal(batch["crop_top_lefts_w"], batch["crop_top_lefts_l"])
    by_row = [batch["pixel_values_w"][batch["row_ids"].argsort()] for batch in epochs]
    assert not torch.equal(*by_row)  # crops and flips change between epochs
    assert len(set(epochs[0]["crop_top_lefts_w"][:, 1].tolist())) > 1  # random crops
    red_grows_right = [bool(pixels[0, :, 0].mean() < pixels[0, :, -1].mean()) for pixels in epochs[0]["pixel_values_w"]]
    assert len(set(red_grows_right)) == 2  # some pairs flipped, some not
    again = one_epoch(dataset, batch_size=3, num_workers=2, epoch=1)
    assert torch.equal(torch.cat([batch["pixel_values_w"] for batch in again]), epochs[1]["pixel_values_w"])


def test_center_crop_without_flip(tmp_path):
    winner, loser = pattern_pair((64, 32))
    batch = first_batch(load(tmp_path, source=pairs(["p"], [winner], [loser]), hflip=False))
    assert batch["crop_top_lefts_w"].tolist() == [[0, 8]]  # 64x32 -> 32x16, 8 columns cut on each side
    assert batch["pixel_values_w"][0, 0, :, 0].mean() < batch["pixel_values_w"][0, 0, :, -1].mean()


# --- order, subsets, resume ----------------------------------------------------------------------------------------


def test_epoch_order_is_seeded_and_resumable_with_accelerate(tmp_path):
    path = write_pickapic_parquet(tmp_path / "p.parquet", red_wins_pickapic(10))

    def row_order(loader):
        return [batch["row_ids"].tolist() for batch in loader]

    loader = prepare_data_loader(make_dataloader(load(tmp_path, dataset_name=path), 3, 0, seed=7))
    loader.set_epoch(1)
    epoch_1 = row_order(loader)
    assert sorted(sum(epoch_1, [])) == list(range(10))
    loader.set_epoch(0)
    assert row_order(loader) != epoch_1
    resumed = prepare_data_loader(make_dataloader(load(tmp_path, dataset_name=path), 3, 0, seed=7))
    resumed.set_epoch(1)
    assert row_order(skip_first_batches(resumed, 2)) == epoch_1[2:]
    unshuffled = make_dataloader(load(tmp_path, dataset_name=path), 4, 0, shuffle=False)
    assert row_order(unshuffled) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_max_train_samples_takes_a_seeded_subset(tmp_path):
    path = write_pickapic_parquet(tmp_path / "p.parquet", red_wins_pickapic(12))

    def subset(seed):
        return load(tmp_path, dataset_name=path, max_train_samples=5, seed=seed).row_ids.tolist()

    assert len(subset(0)) == 5 and subset(0) == subset(0) and subset(0) != subset(1)


# --- bad rows ------------------------------------------------------------------------------------------------------


def bad_rows_manifest(folder, image_files):
    """Eight pairs (red wins) and four rows that cannot be read: corrupt, truncated, missing, no image."""
    red, blue = str(image_files / "red.png"), str(image_files / "blue.png")
    lines = [{"prompt": f"good {i}", "chosen": red, "rejected": blue} for i in range(8)]
    lines += [{"prompt": name, "chosen": red, "rejected": str(image_files / name)}
              for name in ("corrupt.jpg", "truncated.jpg", "missing.png")]
    lines.append({"prompt": "no image", "chosen": None, "rejected": blue})
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(folder / "pairs.jsonl")


def test_bad_rows_are_skipped_counted_and_logged_with_workers(tmp_path, image_files, caplog):
    dataset = load(tmp_path, dataset_name=bad_rows_manifest(tmp_path / "m", image_files))
    tracker = BadRowTracker(max_bad_fraction=0.5, min_rows=1)
    with caplog.at_level(logging.WARNING, logger="data"):
        for batch in one_epoch(dataset, batch_size=3, num_workers=2):
            assert len(batch["captions"]) == len(batch["row_ids"]) == len(batch["pixel_values_w"])
            tracker.update(batch)
    assert tracker.pairs == 8 and tracker.skipped == 4
    reasons = {record.getMessage().split(":")[0]: record.getMessage() for record in caplog.records}
    assert set(reasons) == {"Skipped row 8", "Skipped row 9", "Skipped row 10", "Skipped row 11"}
    assert "rejected: OSError" in reasons["Skipped row 8"] or "UnidentifiedImageError" in reasons["Skipped row 8"]
    assert "truncated" in reasons["Skipped row 9"]
    assert "FileNotFoundError" in reasons["Skipped row 10"] and "missing.png" in reasons["Skipped row 10"]
    assert "chosen: TypeError" in reasons["Skipped row 11"]


def test_too_many_bad_rows_stop_the_run(tmp_path, image_files):
    dataset = load(tmp_path, dataset_name=bad_rows_manifest(tmp_path / "m", image_files))
    tracker = BadRowTracker(max_bad_fraction=0.2, min_rows=len(dataset))
    with pytest.raises(RuntimeError, match=r"4 of the 12 rows .*--max_bad_fraction=0.2.*truncated"):
        for batch in one_epoch(dataset, batch_size=4, num_workers=2, shuffle=False):
            tracker.update(batch)


def test_tracker_counts_fewer_than_min_rows_as_min_rows():
    tracker = BadRowTracker(max_bad_fraction=0.05, min_rows=100)
    no_pairs = {"row_ids": torch.zeros(0, dtype=torch.long), "dropped": []}
    tracker.update({**no_pairs, "skipped": [(i, "bad") for i in range(5)]})  # 5 of 5 bad, but 5 <= 0.05 * 100
    tracker.update({**no_pairs, "row_ids": torch.arange(195), "skipped": []})
    tracker.update({**no_pairs, "skipped": [(200 + i, "bad") for i in range(5)]})  # 10 of 205: still <= 5%
    with pytest.raises(RuntimeError, match="11 of the 206 rows.*max_bad_fraction=0.05"):
        tracker.update({**no_pairs, "skipped": [(300, "bad")]})


def test_empty_batch_when_every_row_is_skipped(tmp_path, image_files):
    missing = str(image_files / "missing.png")
    batch = first_batch(load(tmp_path, source=pairs(["a", "b"], [missing] * 2, [missing] * 2)))
    assert batch["pixel_values_w"].shape == (0, 3, RES, RES) and batch["original_sizes_l"].shape == (0, 2)
    assert [row_id for row_id, _ in batch["skipped"]] == [0, 1]


def test_datasets_pickle_for_spawned_workers(tmp_path):
    path = write_pickapic_parquet(tmp_path / "p.parquet", red_wins_pickapic(2))
    for streaming in (False, True):
        dataset = pickle.loads(pickle.dumps(load(tmp_path, dataset_name=path, streaming=streaming)))
        assert all_red(first_batch(dataset)["pixel_values_w"][0])


# --- streaming -----------------------------------------------------------------------------------------------------


def test_streaming_drops_ties_and_bad_labels_lazily_with_workers(tmp_path, image_files):
    (tmp_path / "shards").mkdir()
    rows = red_wins_pickapic(6) + [("tie", solid(RED), solid(BLUE), 0.5), ("bad", solid(RED), solid(BLUE), 3.0)]
    rows += [("corrupt", solid(RED), (image_files / "corrupt.jpg").read_bytes(), 1.0)]
    # Arrow shards: datasets pauses 5 s after shuffling parquet shards (apache/arrow#45214), too slow for a unit test.
    for shard in range(3):
        write_pickapic_arrow(tmp_path / f"shards/part{shard}.arrow", rows[shard::3])
    dataset = load(tmp_path, dataset_name=str(tmp_path / "shards"), streaming=True)
    tracker = BadRowTracker(max_bad_fraction=0.5, min_rows=1)
    batches = one_epoch(dataset, batch_size=2, num_workers=2)
    for batch in batches:
        tracker.update(batch)
        assert all(all_red(pixels) for pixels in batch["pixel_values_w"])
    assert tracker.counts == {"pairs": 6, "skipped_unreadable": 1, "dropped_tie": 1, "dropped_bad label": 1}
    row_ids = [row_id for batch in batches for row_id in batch["row_ids"].tolist()]
    row_ids += [row_id for batch in batches for row_id, _ in batch["skipped"] + batch["dropped"]]
    assert len(set(row_ids)) == len(row_ids) == 9  # unique within the epoch across workers

    def captions(epoch):
        return [batch["captions"] for batch in one_epoch(dataset, batch_size=2, num_workers=2, epoch=epoch)]

    assert captions(0) == [batch["captions"] for batch in batches] and captions(1) != captions(0)


def test_streaming_max_train_samples_limits_rows_read(tmp_path):
    path = write_pickapic_parquet(tmp_path / "p.parquet", red_wins_pickapic(10))
    dataset = load(tmp_path, dataset_name=path, streaming=True, max_train_samples=4)
    assert sum(len(batch["captions"]) for batch in one_epoch(dataset, shuffle=False)) == 4
