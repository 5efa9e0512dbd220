"""Start-up time of data.py to the first batch on a large synthetic Pick-a-Pic-like dataset.

Writes `--rows` rows (caption, jpg_0, jpg_1, label_0 with about 10% ties) as parquet shards whose images are tiny
JPEGs from a small shared pool, so the set is metadata-sized, then times load_preference_dataset + make_dataloader +
the first batch, each in a fresh process: cold (parquet converted into an empty datasets cache), warm (cache reused)
and streaming.

    python benchmarks/data_startup_bench.py --rows 1000000
"""

import argparse
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

from data import PreferenceDataConfig, load_preference_dataset, make_dataloader  # noqa: E402


def tiny_jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "JPEG")
    return buffer.getvalue()


def write_shards(folder: Path, rows: int, shards: int, seed: int = 0) -> None:
    """Pick-a-Pic-like parquet shards: captions, two images drawn from a pool of 64 tiny JPEGs, labels 1/0/0.5."""
    rng = np.random.default_rng(seed)
    pool = pa.array([tiny_jpeg(tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(64)], pa.binary())
    for shard, rows_in_shard in enumerate(np.array_split(np.arange(rows), shards)):
        first = rng.integers(0, 64, rows_in_shard.size)
        table = pa.table({
            "caption": pa.array([f"a synthetic prompt number {i}" for i in rows_in_shard.tolist()]),
            "jpg_0": pool.take(pa.array(first)),
            "jpg_1": pool.take(pa.array((first + 1 + rng.integers(0, 63, rows_in_shard.size)) % 64)),
            "label_0": pa.array(rng.choice([1.0, 0.0, 0.5], rows_in_shard.size, p=[0.45, 0.45, 0.1])),
        })
        pq.write_table(table, folder / f"train-{shard:05d}-of-{shards:05d}.parquet")


def time_to_first_batch(config: PreferenceDataConfig, batch_size: int, num_workers: int) -> tuple[float, float, dict]:
    """(seconds to load, seconds from start to the first batch, dataset stats)."""
    start = time.perf_counter()
    dataset = load_preference_dataset(config)
    loaded = time.perf_counter() - start
    batches = iter(make_dataloader(dataset, batch_size, num_workers, seed=config.seed))
    batch = next(batches)
    first_batch = time.perf_counter() - start
    assert batch["pixel_values_w"].shape[1:] == (3, config.resolution, config.resolution)
    # Closing the iterator is left out of the timing: datasets pauses 5 s when it closes shuffled parquet streams.
    return loaded, first_batch, dataset.stats


PHASES = {"cold": "cold (parquet -> arrow cache)", "warm": "warm (cache reused)", "streaming": "streaming"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--work_dir", default=None, help="Where to write the data and the cache (default: a temp dir).")
    parser.add_argument("--phase", choices=PHASES, default=None, help="Time one phase on --work_dir's data (internal).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.phase:
        config = PreferenceDataConfig(train_data_dir=str(Path(args.work_dir, "data")),
                                      cache_dir=str(Path(args.work_dir, "cache")),
                                      streaming=args.phase == "streaming", resolution=args.resolution)
        loaded, first_batch, stats = time_to_first_batch(config, args.batch_size, args.num_workers)
        print(f"{PHASES[args.phase]:30s} load {loaded:5.2f} s   first batch {first_batch:5.2f} s   {stats}", flush=True)
        return

    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        data_dir = Path(work_dir, "data")
        data_dir.mkdir()
        start = time.perf_counter()
        write_shards(data_dir, args.rows, args.shards)
        size_mb = sum(f.stat().st_size for f in data_dir.iterdir()) / 1e6
        print(f"wrote {args.rows:,} rows in {args.shards} parquet shards ({size_mb:.0f} MB) "
              f"in {time.perf_counter() - start:.1f} s")
        print(f"batch size {args.batch_size}, {args.num_workers} workers, resolution {args.resolution}; "
              "each phase in a fresh process, disk synced first")
        for phase in PHASES:
            os.sync()  # so writing back the previous phase's cache does not slow this one down
            subprocess.run([sys.executable, __file__, "--phase", phase, "--work_dir", work_dir,
                            "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
                            "--resolution", str(args.resolution)], check=True)


if __name__ == "__main__":
    main()
