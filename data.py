"""Preference pairs for Inversion-DPO: winner/loser image pairs loaded from the hub or local files, checked at load
time, and turned into SDXL-ready batches in which unreadable rows are skipped and counted instead of ending the run."""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.data_files import DataFilesDict, get_data_patterns
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

README_SECTION = 'docs/data.md ("Preference data")'
PICKAPIC_NOTE = "yuvalkirstain/pickapic_v2 has been reported unavailable on the hub since 2025"

LABEL_VALUES = (0.0, 0.5, 1.0)
TIE = "tie"
IDENTICAL = "identical images"
BAD_LABEL = "bad label"

DATA_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
CAPTION_NAMES = ("caption", "prompt")
WINNER_NAMES = ("chosen", "winner")
LOSER_NAMES = ("rejected", "loser")
PICKAPIC_IMAGES_AND_LABEL = ("jpg_0", "jpg_1", "label_0")
SAVED_DATASET_STREAM_SHARDS = 64
LISTED_FILES = 10
BULLET = "\n  - "
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
TEXT_DTYPES = {"string", "large_string"}
IMAGE_VALUE_DTYPES = {"binary", "large_binary", "string", "large_string"}

SCHEMA_HELP = (
    "Supported schemas:\n"
    "  - Pick-a-Pic: caption, jpg_0, jpg_1 (encoded image bytes), label_0 (1: jpg_0 wins, 0: jpg_1 wins, 0.5: tie)\n"
    "  - chosen/rejected: prompt or caption, chosen or winner, rejected or loser "
    "(a datasets Image feature, encoded bytes, PIL images or file paths)\n"
    "Or name the columns yourself: --caption_column plus either "
    "--image_0_column/--image_1_column/--label_column or --winner_column/--loser_column."
)


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class PreferenceDataConfig:
    """Where the preference pairs come from, which columns hold them, and how their images become tensors."""

    dataset_name: str | None = _option(
        None, "Hub dataset id, or a local file or folder (parquet, arrow, jsonl, csv, save_to_disk, manifest)."
    )
    train_data_dir: str | None = _option(None, "Local folder of preference data (a local --dataset_name).")
    dataset_config_name: str | None = _option(None, "Configuration (subset) of a hub dataset.")
    dataset_split: str = _option("train", "Split to train on.")
    cache_dir: str | None = _option(None, "Where datasets stores downloads and converted files.")
    streaming: bool = _option(False, "Stream the rows instead of downloading or converting the dataset first.")
    shuffle_buffer_size: int = _option(1000, "Rows held in the shuffle buffer when streaming.")
    caption_column: str | None = _option(None, "Caption column (detected: caption, prompt).")
    image_0_column: str | None = _option(None, "First image of a labelled pair (Pick-a-Pic: jpg_0).")
    image_1_column: str | None = _option(None, "Second image of a labelled pair (Pick-a-Pic: jpg_1).")
    label_column: str | None = _option(
        None, "Label of a labelled pair: 1 first wins, 0 second wins, 0.5 tie (Pick-a-Pic: label_0)."
    )
    winner_column: str | None = _option(None, "Preferred image (detected: chosen, winner).")
    loser_column: str | None = _option(None, "Rejected image (detected: rejected, loser).")
    resolution: int = _option(1024, "Side of the square crop; the shorter image side is resized to it.")
    random_crop: bool = _option(False, "Crop at a random position instead of the center.")
    hflip: bool = _option(True, "Flip winner and loser together with probability 0.5 (--no_hflip turns it off).")
    max_train_samples: int | None = _option(
        None, "Train on a seeded random subset of this many pairs (streaming: the first this many rows)."
    )
    max_bad_fraction: float = _option(
        0.05, "Stop the run when more than this fraction of the rows read is unreadable or mislabelled."
    )
    seed: int = _option(0, "Seed of the subset, the crops and the flips.")


@dataclass(frozen=True)
class PairColumns:
    """The columns forming a pair: labelled (first, second and label) or winner/loser (label None, first wins)."""

    caption: str
    first: str
    second: str
    label: str | None = None

    @property
    def names(self) -> list[str]:
        return [name for name in (self.caption, self.first, self.second, self.label) if name is not None]


def detect_columns(column_names: list[str], config: PreferenceDataConfig) -> PairColumns:
    """The pair columns named by the config's column flags, or else recognised from the column names."""
    found = list(column_names)
    labelled_flags = {
        "--image_0_column": config.image_0_column,
        "--image_1_column": config.image_1_column,
        "--label_column": config.label_column,
    }
    winner_loser_flags = {"--winner_column": config.winner_column, "--loser_column": config.loser_column}
    if any(labelled_flags.values()) and any(winner_loser_flags.values()):
        raise ValueError(
            "Give either --image_0_column/--image_1_column/--label_column (labelled pairs) or "
            "--winner_column/--loser_column (winner/loser pairs), not both."
        )
    labelled = any(labelled_flags.values()) or (
        not any(winner_loser_flags.values()) and set(PICKAPIC_IMAGES_AND_LABEL) <= set(found)
    )
    if labelled:
        pair = [
            _pick(value, flag, (default,), found)
            for (flag, value), default in zip(labelled_flags.items(), PICKAPIC_IMAGES_AND_LABEL)
        ]
    else:
        pair = [
            _pick(config.winner_column, "--winner_column", WINNER_NAMES, found),
            _pick(config.loser_column, "--loser_column", LOSER_NAMES, found),
        ]
    picks = [_pick(config.caption_column, "--caption_column", CAPTION_NAMES, found), *pair]
    missing = [
        f"{flag.removeprefix('--').removesuffix('_column')} column ({flag}; tried {', '.join(tried)})"
        for column, flag, tried in picks
        if column is None
    ]
    if missing:
        raise ValueError(
            f"No preference schema matches the columns {found}. Missing: {'; '.join(missing)}.\n{SCHEMA_HELP}"
        )
    return PairColumns(*(column for column, _, _ in picks))


def _pick(
    flag_value: str | None, flag: str, candidates: tuple[str, ...], found: list[str]
) -> tuple[str | None, str, tuple[str, ...]]:
    """(column or None, flag, names tried): the flagged column if present, else the first candidate present."""
    tried = (flag_value,) if flag_value else candidates
    return next((name for name in tried if name in found), None), flag, tried


def check_column_types(features: datasets.Features, columns: PairColumns) -> None:
    """Raise ValueError naming every pair column whose type cannot hold what its role needs."""
    problems = []
    if not _is_value_of(features[columns.caption], TEXT_DTYPES):
        problems.append(f"caption column '{columns.caption}' holds {features[columns.caption]}, not text")
    for name in (columns.first, columns.second):
        if not _is_image(features[name]):
            problems.append(
                f"image column '{name}' holds {features[name]}, not an Image feature, encoded bytes or file paths"
            )
    if columns.label is not None and not _is_number(features[columns.label]):
        problems.append(f"label column '{columns.label}' holds {features[columns.label]}, not numbers 0, 0.5 or 1")
    if problems:
        raise ValueError(
            f"Wrongly typed columns: {'; '.join(problems)}. Columns found: {dict(features)}.\n{SCHEMA_HELP}"
        )


def _is_value_of(feature: Any, dtypes: set[str]) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in dtypes


def _is_image(feature: Any) -> bool:
    if isinstance(feature, dict):
        return bool({"bytes", "path"} & set(feature))
    return isinstance(feature, datasets.Image) or _is_value_of(feature, IMAGE_VALUE_DTYPES)


def _is_number(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and (
        feature.dtype == "bool" or feature.dtype.startswith(("int", "uint", "float"))
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of `image`: 16-bit gray scaled to 8 bits, transparency composited on white, other modes converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 instead of scaling them.
        gray = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(gray, "L")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(encoded: bytes | Image.Image) -> Image.Image:
    """The RGB image in `encoded` (bytes of an image file, or a PIL image), fully decoded and EXIF-oriented."""
    image = encoded if isinstance(encoded, Image.Image) else Image.open(io.BytesIO(encoded))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def _record(row_id: int, skipped: list | None = None, dropped: list | None = None) -> dict:
    """An item without a pair: the row was skipped (unreadable) or dropped (tie, identical images, bad label)."""
    return {"row_id": row_id, "skipped": skipped or [], "dropped": dropped or []}


@dataclass(frozen=True)
class PairReader:
    """Turns a source row into an item: the pair decoded, cropped and flipped together, or a skip/drop record."""

    columns: PairColumns
    resolution: int
    random_crop: bool
    hflip: bool
    seed: int
    base_dir: str | None = None

    def __call__(self, row: dict, row_id: int, epoch: int) -> dict:
        winner, loser = self.columns.first, self.columns.second
        if self.columns.label is not None:
            label = row[self.columns.label]
            if isinstance(label, str) or label not in LABEL_VALUES:
                return _record(row_id, dropped=[(row_id, BAD_LABEL)])
            if label == 0.5:
                return _record(row_id, dropped=[(row_id, TIE)])
            if label == 0:
                winner, loser = loser, winner
        encoded = {}
        for role, column in (("w", winner), ("l", loser)):
            try:
                encoded[role] = self._encoded(row[column])
            except Exception as error:  # any unreadable value skips only this row; BadRowTracker bounds how many
                return _record(row_id, skipped=[(row_id, f"{column}: {type(error).__name__}: {error}")])
        if encoded["w"] == encoded["l"]:
            return _record(row_id, dropped=[(row_id, IDENTICAL)])
        images = {}
        for role, column in (("w", winner), ("l", loser)):
            try:
                images[role] = decode_image(encoded[role])
            except Exception as error:  # corrupt, truncated or exotic files: same policy as above
                return _record(row_id, skipped=[(row_id, f"{column}: {type(error).__name__}: {error}")])
        return self._transform(images, row[self.columns.caption] or "", row_id, epoch)

    def _encoded(self, value: Any) -> bytes | Image.Image:
        """The encoded bytes (or PIL image) of an image cell: bytes, a path, or a datasets {bytes, path} dict."""
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, str):
            path = Path(value).expanduser()
            if not path.is_absolute() and self.base_dir is not None:
                path = Path(self.base_dir) / path
            return path.read_bytes()
        raise TypeError(f"no image in a cell holding {type(value).__name__}")

    def _transform(self, images: dict[str, Image.Image], caption: str, row_id: int, epoch: int) -> dict:
        """Resize each image's shorter side to the resolution, then flip and crop both at the same relative place."""
        size = self.resolution
        # Seeding by (seed, epoch, row) keeps augmentation independent of worker count and of resume position.
        fraction_top, fraction_left, flip_draw = np.random.default_rng([self.seed, epoch, row_id]).random(3)
        if not self.random_crop:
            fraction_top = fraction_left = 0.5
        flip = self.hflip and flip_draw < 0.5
        item = {"caption": str(caption), **_record(row_id)}
        for role, image in images.items():
            width, height = image.size
            scale = size / min(width, height)
            new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
            image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            top = min(new_height - size, int(fraction_top * (new_height - size + 1)))
            left = min(new_width - size, int(fraction_left * (new_width - size + 1)))
            item[f"pixel_values_{role}"] = _pixels(image.crop((left, top, left + size, top + size)))
            item[f"original_size_{role}"] = (height, width)
            item[f"crop_top_left_{role}"] = (top, left)
        return item


class _PairSource:
    """What both dataset kinds share: a `reader` that makes the items and an `epoch` that seeds crops and flips."""

    reader: PairReader
    epoch: int = 0

    @property
    def resolution(self) -> int:
        return self.reader.resolution

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the crops and flips (and, when streaming, the shuffle buffer)."""
        self.epoch = epoch


class PreferenceDataset(_PairSource, torch.utils.data.Dataset):
    """Map-style preference pairs: the rows kept at load time, read, decoded and transformed on access."""

    def __init__(self, rows: datasets.Dataset, row_ids: np.ndarray, reader: PairReader, stats: dict):
        self.rows = rows
        self.row_ids = row_ids
        self.reader = reader
        self.stats = stats

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, index: int) -> dict:
        row_id = int(self.row_ids[index])
        return self.reader(self.rows[row_id], row_id, self.epoch)


class StreamingPreferenceDataset(_PairSource, torch.utils.data.IterableDataset):
    """Streamed preference pairs; ties and bad labels are dropped as they are read and reported with the next item."""

    def __init__(self, rows: datasets.IterableDataset, reader: PairReader, shuffle_buffer_size: int):
        self.rows = rows
        self.reader = reader
        self.shuffle_buffer_size = shuffle_buffer_size
        self.stats = {"rows": None, "ties_dropped": None, "bad_labels": None, "kept": None}

    def for_process(self, index: int, count: int) -> StreamingPreferenceDataset:
        """The part of the stream that training process `index` of `count` reads (every process reads its own)."""
        from datasets.distributed import split_dataset_by_node

        part = copy.copy(self)
        part.rows = split_dataset_by_node(self.rows, rank=index, world_size=count)
        return part

    def shuffled(self, seed: int) -> StreamingPreferenceDataset:
        """A copy read through a shuffle buffer seeded by `seed` (and the epoch)."""
        shuffled = copy.copy(self)
        shuffled.rows = self.rows.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        return shuffled

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        self.rows.set_epoch(self.epoch)
        pending: list = []
        row_id = -1
        # datasets hands each DataLoader worker its own shards, so row ids interleave the workers' read positions.
        for position, row in enumerate(self.rows):
            row_id = position * num_workers + worker_id
            item = self.reader(row, row_id, self.epoch)
            if "pixel_values_w" in item or item["skipped"]:
                item["dropped"] = pending + item["dropped"]
                pending = []
                yield item
            else:
                pending.extend(item["dropped"])
        if pending:
            yield _record(row_id, dropped=pending)


def load_preference_dataset(
    config: PreferenceDataConfig, source: datasets.Dataset | datasets.IterableDataset | None = None
) -> PreferenceDataset | StreamingPreferenceDataset:
    """The preference pairs named by `config` (or held in `source`), schema and labels checked.

    Raises ValueError with the columns found and what would work when the data cannot be used.
    """
    if config.resolution < 1 or not 0 <= config.max_bad_fraction <= 1:
        raise ValueError("--resolution must be positive and --max_bad_fraction within [0, 1].")
    rows, base_dir = (source, None) if source is not None else _load_rows(config)
    column_names = rows.column_names if rows.column_names is not None else list(next(iter(rows), {}))
    columns = detect_columns(column_names, config)
    if rows.features is not None:
        check_column_types(rows.features, columns)
    rows = rows.select_columns(columns.names)
    for name in (columns.first, columns.second):
        if rows.features is not None and isinstance(rows.features[name], datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
    reader = PairReader(columns, config.resolution, config.random_crop, config.hflip, config.seed, base_dir)
    if isinstance(rows, datasets.IterableDataset):
        if config.max_train_samples is not None:
            rows = rows.take(config.max_train_samples)
        dataset = StreamingPreferenceDataset(rows, reader, config.shuffle_buffer_size)
    else:
        dataset = _map_style(rows, columns, reader, config)
    logger.info("Preference data: columns %s, counts %s", columns, dataset.stats)
    return dataset


def _map_style(
    rows: datasets.Dataset, columns: PairColumns, reader: PairReader, config: PreferenceDataConfig
) -> PreferenceDataset:
    """Drop ties using the label column alone (no image is read), then take the seeded subset."""
    if len(rows) == 0:
        raise ValueError("The dataset has no rows.")
    _reject_urls(rows, columns)
    keep = np.arange(len(rows))
    ties = 0
    if columns.label is not None:
        raw_labels = rows.select_columns([columns.label]).with_format("arrow")[:][columns.label]
        labels = pc.cast(raw_labels, pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isin(labels, LABEL_VALUES))
        if bad.size:
            raise ValueError(
                f"Label column '{columns.label}' must hold 0 ({columns.second} wins), 0.5 (tie) or 1 "
                f"({columns.first} wins), but row {bad[0]} holds {raw_labels[int(bad[0])].as_py()!r} "
                f"({bad.size} such rows; first rows: {bad[:10].tolist()})."
            )
        is_tie = labels == 0.5
        ties = int(is_tie.sum())
        keep = np.flatnonzero(~is_tie)
    if keep.size == 0:
        raise ValueError(f"No pairs left: all {len(rows)} rows are ties.")
    if config.max_train_samples is not None and config.max_train_samples < keep.size:
        subset = np.random.default_rng(config.seed).permutation(keep.size)[: config.max_train_samples]
        keep = keep[np.sort(subset)]
    stats = {"rows": len(rows), "ties_dropped": ties, "bad_labels": 0, "kept": int(keep.size)}
    return PreferenceDataset(rows, keep, reader, stats)


def _reject_urls(rows: datasets.Dataset, columns: PairColumns) -> None:
    """Raise when image columns hold URLs: they would fail row by row, so say it once at load time."""
    first_row = rows.select_columns([columns.first, columns.second])[0]
    for name, value in first_row.items():
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            raise ValueError(
                f"Image column '{name}' holds URLs (e.g. {value!r}). Download the images and point a manifest "
                f"(jsonl or csv with local paths) at them; see {README_SECTION}."
            )


def _load_rows(config: PreferenceDataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, str | None]:
    """The rows of the configured source, and the folder that relative image paths are resolved against."""
    if config.dataset_name and config.train_data_dir:
        raise ValueError("Give --dataset_name or --train_data_dir, not both.")
    name = config.dataset_name or config.train_data_dir
    if not name:
        raise ValueError(f"Give --dataset_name (a hub id or a local path) or --train_data_dir; see {README_SECTION}.")
    path = Path(name).expanduser().resolve()
    if path.exists():
        return _load_local(path, config), str(path if path.is_dir() else path.parent)
    if config.train_data_dir or name.startswith(("/", ".", "~")) or path.suffix in DATA_FORMATS:
        raise ValueError(f"Local path {name!r} does not exist.")
    return _load_hub(name, config), None


def _load_hub(name: str, config: PreferenceDataConfig) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(
            name,
            config.dataset_config_name,
            split=config.dataset_split,
            cache_dir=config.cache_dir,
            streaming=config.streaming,
        )
    except (FileNotFoundError, ConnectionError) as error:
        raise ValueError(
            f"Could not load {name!r} from the Hugging Face Hub, and it is not a local path: {error}\n"
            f"Note that {PICKAPIC_NOTE}. For alternatives (a mirror, the no-images variant plus your own "
            "downloads, other preference datasets, or your own pairs as a local folder or manifest) see "
            f"{README_SECTION}."
        ) from error


def _load_local(path: Path, config: PreferenceDataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The rows of a local data file, folder of data files or save_to_disk folder; data files are checked first."""
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return _load_saved(path, config)
    if not path.is_file():
        folder, files = path, _split_files(path, config.dataset_split)
    elif path.suffix in DATA_FORMATS:
        folder, files = path.parent, [path]
    else:
        raise ValueError(
            f"{path} must be one data file or a folder of data files of one format ({', '.join(DATA_FORMATS)}), "
            f"a save_to_disk folder, or a manifest; found {path.suffix or path.name!r}."
        )
    columns = _data_file_columns(folder, files, config)
    data_format = DATA_FORMATS[next(iter(columns)).suffix]
    data_files = [str(file) for file in columns]
    if data_format == "arrow" and not config.streaming:
        # Arrow shards are memory-mapped as they are; load_dataset would first copy them into the cache.
        return datasets.concatenate_datasets([datasets.Dataset.from_file(file) for file in data_files])
    groups = [data_files]
    if data_format == "csv" and not config.streaming:
        # pandas keeps each csv file's column order and the csv builder writes them to one table unreordered, which
        # fails; files loaded per column order are concatenated by column name instead.
        by_order: dict[tuple, list[str]] = {}
        for file, names in columns.items():
            by_order.setdefault(tuple(names), []).append(str(file))
        groups = list(by_order.values())
    loaded = [
        datasets.load_dataset(
            data_format, data_files=group, split="train", cache_dir=config.cache_dir, streaming=config.streaming
        )
        for group in groups
    ]
    return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)


def _split_files(folder: Path, split: str) -> list[Path]:
    """The data files of `split` in `folder`, split by file and folder names as on the hub (all files: train)."""
    try:
        by_split = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except FileNotFoundError:  # no files, or hidden ones only
        by_split = DataFilesDict()
    files_by_split = {
        str(name): [Path(file) for file in files if Path(file).suffix in DATA_FORMATS]
        for name, files in by_split.items()
    }
    files_by_split = {name: files for name, files in files_by_split.items() if files}
    if not files_by_split:
        found = sorted({str(Path(file).relative_to(folder)) for files in by_split.values() for file in files})
        raise ValueError(
            f"{folder} holds no data files, which end in {', '.join(DATA_FORMATS)} (its subfolders are searched "
            f"too), and is no save_to_disk folder; found: {_some(found, ', ') or 'nothing'}."
        )
    if split not in files_by_split:
        raise ValueError(
            f"{folder} has no data files ({', '.join(DATA_FORMATS)}) for split {split!r}; "
            f"splits found: {sorted(files_by_split)} (choose one with --dataset_split)."
        )
    return files_by_split[split]


def _data_file_columns(
    folder: Path, files: list[Path], config: PreferenceDataConfig
) -> dict[Path, list[str] | None]:
    """The columns of each data file, read from its metadata or first line only (see `_file_columns`).

    Raises ValueError, before datasets converts anything, when the files mix formats, when some cannot be read
    (empty ones included) or when their column sets differ: datasets would stop midway through its conversion.
    """
    by_format: dict[str, list[str]] = {}
    for file in files:
        by_format.setdefault(DATA_FORMATS[file.suffix], []).append(str(file.relative_to(folder)))
    if len(by_format) > 1:
        listing = "".join(f"{BULLET}{data_format}: {_some(names, ', ')}" for data_format, names in by_format.items())
        raise ValueError(
            f"{folder} mixes data formats, which datasets cannot read as one dataset:{listing}\n"
            "Keep the files of one format in the folder (move the others out), or point --dataset_name at one file."
        )
    columns: dict[Path, list[str] | None] = {}
    unreadable = []
    for file in files:
        try:
            columns[file] = _file_columns(file, DATA_FORMATS[file.suffix])
        except (OSError, ValueError, csv.Error) as error:  # empty, truncated or not of its format: name them all
            unreadable.append(f"{file.relative_to(folder)}: {error}")
    if unreadable:
        raise ValueError(
            f"datasets cannot read these data files in {folder}:{BULLET}{_some(unreadable, BULLET)}\n"
            "Delete them from the folder (or write them again)."
        )
    by_columns: dict[frozenset, list[Path]] = {}
    for file, names in columns.items():
        if names is not None:
            by_columns.setdefault(frozenset(names), []).append(file)
    if len(by_columns) > 1:
        raise ValueError(_different_columns_message(folder, list(by_columns.values()), columns, config))
    return columns


def _file_columns(file: Path, data_format: str) -> list[str] | None:
    """The columns of a data file, from its metadata, schema or first line; None for a json file whose first line
    is no JSON object (no rows, or not JSON lines), which datasets reads whole.

    Raises ValueError (or the reader's error) saying why datasets could not read the file.
    """
    if data_format == "json":
        # An empty json file loads, as no rows; its first line is all that is read here.
        with file.open(encoding="utf-8") as lines:
            first = next((line for line in lines if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return None
        return list(record) if isinstance(record, dict) else None
    if file.stat().st_size == 0:
        raise ValueError("empty (0 bytes)")
    if data_format == "csv":
        with file.open(encoding="utf-8-sig", newline="") as text:
            header = next((row for row in csv.reader(text) if row), None)
        if header is None:
            raise ValueError("no header line")
        return header
    if data_format == "parquet":
        with pq.ParquetFile(file) as parquet:
            if parquet.metadata.num_rows == 0:
                raise ValueError("no rows (datasets cannot read a parquet file without rows)")
            return parquet.schema_arrow.names
    with pa.memory_map(str(file)) as source:
        try:
            return pa.ipc.open_stream(source).schema.names
        except pa.ArrowInvalid:  # datasets' arrow builder also reads the Arrow file format
            return pa.ipc.open_file(source).schema.names


def _different_columns_message(
    folder: Path, groups: list[list[Path]], columns: dict[Path, list[str] | None], config: PreferenceDataConfig
) -> str:
    """What to say when the data files in `groups` (one list per column set) differ in columns."""
    usable = []
    lines = []
    for group in groups:
        try:
            detect_columns(columns[group[0]], config)
        except ValueError:
            verdict = "no preference schema"
        else:
            usable.append(group[0])
            verdict = "preference pairs"
        names = _some([str(file.relative_to(folder)) for file in group], ", ")
        lines.append(f"{BULLET}{names}: {', '.join(columns[group[0]])} ({verdict})")
    example = f" (e.g. --dataset_name {usable[0]})" if usable else ""
    help_text = "" if usable else f"\n{SCHEMA_HELP}"
    return (
        f"{folder} holds data files with different columns, which datasets cannot read as one table:{''.join(lines)}"
        f"\nPoint --dataset_name at one file{example}, or at a folder holding only files with the same columns."
        f"{help_text}"
    )


def _some(items: list[str], separator: str) -> str:
    """The first LISTED_FILES of `items` joined by `separator`, and how many more there are."""
    more = f" (and {len(items) - LISTED_FILES} more)" if len(items) > LISTED_FILES else ""
    return separator.join(items[:LISTED_FILES]) + more


def _load_saved(path: Path, config: PreferenceDataConfig) -> datasets.Dataset | datasets.IterableDataset:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if config.dataset_split not in saved:
            raise ValueError(
                f"{path} has no split {config.dataset_split!r}; splits: {sorted(saved)} (--dataset_split)."
            )
        saved = saved[config.dataset_split]
    if config.streaming:
        return saved.to_iterable_dataset(num_shards=max(1, min(len(saved), SAVED_DATASET_STREAM_SHARDS)))
    return saved


def collate_pairs(items: list[dict], resolution: int) -> dict:
    """A batch of the pairs among `items`, with the rows skipped or dropped in the workers listed alongside."""
    pairs = [item for item in items if "pixel_values_w" in item]

    def long_pairs(key: str) -> torch.Tensor:
        return torch.tensor([pair[key] for pair in pairs], dtype=torch.long).reshape(-1, 2)

    def pixels(key: str) -> torch.Tensor:
        return torch.stack([pair[key] for pair in pairs]) if pairs else torch.empty(0, 3, resolution, resolution)

    return {
        "pixel_values_w": pixels("pixel_values_w"),
        "pixel_values_l": pixels("pixel_values_l"),
        "captions": [pair["caption"] for pair in pairs],
        "original_sizes_w": long_pairs("original_size_w"),
        "original_sizes_l": long_pairs("original_size_l"),
        "crop_top_lefts_w": long_pairs("crop_top_left_w"),
        "crop_top_lefts_l": long_pairs("crop_top_left_l"),
        "row_ids": torch.tensor([pair["row_id"] for pair in pairs], dtype=torch.long),
        "skipped": [entry for item in items for entry in item["skipped"]],
        "dropped": [entry for item in items for entry in item["dropped"]],
    }


class EpochSampler(torch.utils.data.Sampler[int]):
    """Every index of a PreferenceDataset once per epoch, in an order fixed by (seed, epoch) so a resume can rebuild it.

    `set_epoch` also sets the dataset's epoch, which seeds the crops and flips.
    """

    def __init__(self, dataset: PreferenceDataset, shuffle: bool, seed: int):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset)).tolist())


def make_dataloader(
    dataset: PreferenceDataset | StreamingPreferenceDataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of pair batches (see `collate_pairs`); call `set_loader_epoch` on it before each epoch."""
    collate = functools.partial(collate_pairs, resolution=dataset.resolution)
    if isinstance(dataset, StreamingPreferenceDataset):
        return torch.utils.data.DataLoader(
            dataset.shuffled(seed) if shuffle else dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=drop_last,
        )
    # Workers are not persistent so each epoch's workers copy the dataset with that epoch set.
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(dataset, shuffle, seed),
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=False,
    )


def set_loader_epoch(dataloader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Make a loader from make_dataloader (accelerate-prepared or not) give epoch `epoch`'s order, crops and flips."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)  # accelerate's loaders forward it to the sampler and the dataset
        return
    for holder in (dataloader.sampler, dataloader.dataset):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)


class BadRowTracker:
    """Counts, in the main process, the pairs trained on and the rows the workers skipped or dropped, and logs each skip.

    `update` raises once the unreadable or mislabelled rows exceed `max_bad_fraction` of the rows read, where fewer
    than `min_rows` rows read count as `min_rows`: a bad row in the first batch does not stop a run, and a dataset
    that is all bad stops after `max_bad_fraction * min_rows` rows.
    """

    def __init__(self, max_bad_fraction: float, min_rows: int = 1000):
        self.max_bad_fraction = max_bad_fraction
        self.min_rows = min_rows
        self.pairs = 0
        self.skipped = 0
        self.dropped: Counter[str] = Counter()
        self.recent_bad: deque[str] = deque(maxlen=5)

    @property
    def bad(self) -> int:
        return self.skipped + self.dropped[BAD_LABEL]

    @property
    def counts(self) -> dict[str, int]:
        dropped = {f"dropped_{reason}": count for reason, count in self.dropped.items()}
        return {"pairs": self.pairs, "skipped_unreadable": self.skipped, **dropped}

    def update(self, batch: dict) -> None:
        self.pairs += len(batch["row_ids"])
        for row_id, reason in batch["skipped"]:
            logger.warning("Skipped row %d: %s", row_id, reason)
            self.recent_bad.append(f"row {row_id}: {reason}")
        self.skipped += len(batch["skipped"])
        for row_id, reason in batch["dropped"]:
            self.dropped[reason] += 1
            if reason == BAD_LABEL:
                logger.warning("Dropped row %d: label not 0, 0.5 or 1", row_id)
                self.recent_bad.append(f"row {row_id}: {reason}")
            else:
                logger.debug("Dropped row %d: %s", row_id, reason)
        seen = self.pairs + self.bad
        if self.bad > self.max_bad_fraction * max(seen, self.min_rows):
            raise RuntimeError(
                f"{self.bad} of the {seen} rows read so far ({self.bad / seen:.1%}) had an unreadable image or an "
                f"invalid label, more than --max_bad_fraction={self.max_bad_fraction}. Latest: "
                f"{'; '.join(self.recent_bad)}. Fix or filter the data, or raise --max_bad_fraction."
            )
