"""``modula-ray data build``: every domain's source -> ``DIR/<domain>/{train,val,test}.parquet``.

Each candidate row is deduplicated by its normalised prompt and placed by ``split_of`` (a
hash of its split key), so a prompt can never sit in two splits; held-out rows go to test
only. The folder is built in a temporary sibling and renamed into place: a failed build
never touches an earlier good one. The same size and seed give byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataValidationError
from ..fileio import atomic_dir, atomic_write_json, read_json, sha256_file
from .schema import SPLITS, normalise_prompt, rows_to_table, split_of, validate_table
from .sources import SIZES, SOURCES, Quota, get_source

DATASETS_JSON = "datasets.json"
SCHEMA_VERSION = 1


def split_rows(source, quota: Quota, seed: int) -> dict[str, list[dict]]:
    """Fill each split's quota from the source's candidates; append held-out rows to test."""
    buckets = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for row in source.candidates(seed, quota):
        key = normalise_prompt(row["prompt"])
        if key in seen:
            continue
        seen.add(key)
        split = split_of(row.pop("split_key"))
        if len(buckets[split]) < quota[split]:
            buckets[split].append(row)
        if all(len(buckets[s]) >= quota[s] for s in SPLITS):
            break
    for row in source.held_out(seed, quota):
        key = normalise_prompt(row["prompt"])
        if key not in seen:
            seen.add(key)
            row.pop("split_key")
            buckets["test"].append(row)
    return buckets


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, str(path), compression="zstd", write_statistics=False)


def build_datasets(size: str, seed: int, out, domains: list[str] | None = None, progress: bool = True) -> dict:
    """Build the splits of ``domains`` (default: every registered source) into ``out``; return what ``datasets.json`` holds."""
    from tqdm.auto import tqdm

    if size not in SIZES:
        from ..errors import ConfigError
        raise ConfigError("size", f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    domains = list(domains or sorted(SOURCES))
    sources = {name: get_source(name) for name in domains}
    index = {"schema_version": SCHEMA_VERSION, "seed": seed, "size": size, "domains": {}}
    out = Path(out)
    with atomic_dir(out) as tmp:
        bar = tqdm(domains, desc=f"data build ({size}, seed {seed})", unit="domain", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            buckets = split_rows(sources[name], SIZES[size], seed)
            (tmp / name).mkdir()
            entry = {"description": sources[name].description, "splits": {}}
            for split in SPLITS:
                if not buckets[split]:
                    raise DataValidationError(out / name / f"{split}.parquet", None, None,
                                              f"source {name!r} produced no {split} rows")
                path = tmp / name / f"{split}.parquet"
                write_parquet(validate_table(rows_to_table(buckets[split]), path), path)
                entry["splits"][split] = {"path": f"{name}/{split}.parquet", "rows": len(buckets[split]),
                                          "sha256": sha256_file(path)}
            index["domains"][name] = entry
        atomic_write_json(tmp / DATASETS_JSON, index)
    return index


def read_datasets_json(data_dir) -> dict:
    """Read ``DATA_DIR/datasets.json``; a missing or foreign file raises DataValidationError."""
    path = Path(data_dir) / DATASETS_JSON
    index = read_json(path, error_cls=lambda p, m: DataValidationError(p, None, None, m))
    if not isinstance(index, dict) or "domains" not in index:
        raise DataValidationError(path, None, "domains", "not a modula-ray datasets.json")
    return index


def split_file(data_dir, domain: str, split: str, check_hash: bool = True) -> Path:
    """Path of one split, checked against ``datasets.json``'s sha256 (a changed file is an error)."""
    index = read_datasets_json(data_dir)
    if domain not in index["domains"]:
        raise DataValidationError(Path(data_dir) / DATASETS_JSON, None, "domains",
                                  f"no domain {domain!r}; built: {sorted(index['domains'])}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = index["domains"][domain]["splits"][split]
    path = Path(data_dir) / entry["path"]
    if check_hash and path.is_file() and sha256_file(path) != entry["sha256"]:
        raise DataValidationError(path, None, None, "sha256 differs from datasets.json: the file was changed")
    return path
