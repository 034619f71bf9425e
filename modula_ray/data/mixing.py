"""Mix domains by weight (pure pyarrow; no Ray).

With weights ``w``, domain d supplies ``round(N * w_d / sum(w))`` of the ``N`` rows (N = all
rows of the listed domains): whole copies first, then a seeded sample without replacement,
so a small domain is upsampled and a large one downsampled. The result is shuffled with the
seed. Without weights the domains are simply concatenated and shuffled.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import ConfigError


def domain_counts(rows: dict[str, int], weights: dict[str, float] | None) -> dict[str, int]:
    if weights is None:
        return dict(rows)
    unknown = sorted(set(weights) - set(rows))
    if unknown:
        raise ConfigError("weights", f"weights name domains {unknown} that are not being mixed ({sorted(rows)})")
    bad = {d: w for d, w in weights.items() if not isinstance(w, (int, float)) or w < 0}
    if bad or sum(weights.values()) <= 0:
        raise ConfigError("weights", f"weights must be >= 0 and not all zero, got {weights}")
    total, weight_sum = sum(rows.values()), sum(weights.get(d, 0.0) for d in rows)
    return {d: int(round(total * weights.get(d, 0.0) / weight_sum)) for d in rows}


def mix_tables(tables: dict[str, pa.Table], weights: dict[str, float] | None = None, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    counts = domain_counts({d: t.num_rows for d, t in tables.items()}, weights)
    parts = []
    for domain, table in tables.items():
        want, have = counts[domain], table.num_rows
        if want == 0 or have == 0:
            continue
        index = np.concatenate([np.tile(np.arange(have), want // have),
                                np.sort(rng.choice(have, size=want % have, replace=False))])
        parts.append(table.take(pa.array(index)))
    mixed = pa.concat_tables(parts)
    return mixed.take(pa.array(rng.permutation(mixed.num_rows)))
