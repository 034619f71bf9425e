"""``mixed_ray_dataset``: the Parquet splits of a data folder as a ``ray.data.Dataset``.

The only module of ``data/`` that touches Ray, and only inside the function. Files are read
and validated through pyarrow (``read_split``), checked against ``datasets.json`` hashes,
mixed by weight (``mix_tables``) and handed to Ray Data in several blocks so train workers
can each take a shard with ``ray.train.get_dataset_shard``.
"""
from __future__ import annotations

from .build import split_file
from .mixing import mix_tables
from .schema import read_split


def read_domains(data_dir, domains: list[str], split: str, weights: dict[str, float] | None = None, seed: int = 0):
    """pyarrow Table of the mixed rows (what ``mixed_ray_dataset`` wraps)."""
    tables = {d: read_split(split_file(data_dir, d, split)) for d in domains}
    return mix_tables(tables, weights, seed)


def mixed_ray_dataset(data_dir, domains: list[str], split: str, weights: dict[str, float] | None = None, *,
                      seed: int = 0, blocks: int = 8):
    import ray.data

    table = read_domains(data_dir, domains, split, weights, seed)
    step = max(1, -(-table.num_rows // blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
