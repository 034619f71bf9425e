"""Which run folders a hot-plug may read, what a loaded composition is, and how replicas follow.

A hot-plug (``POST /v1/admin/experts``) names a run folder. It is read only if, once symlinks
and ``..`` are resolved, it is one of the roots the server was started with (its run folders and
``admin_roots``) or lies under one; anything else is refused before the disk is touched.

The call reaches one replica. That replica records what it plugged in ``RUN/serve/plugged.json``
(the sha256 of the manifest it loaded), signed with the admin token (HMAC-SHA256); every replica
serving the folder reads the record at most every ``FOLLOW_EVERY_S`` (off the event loop) and,
when it holds a plug it has not acted on yet, loads and swaps in the background. A record that is
unsigned, signed with another token or malformed is ignored with one log line, so whoever can write
the folder but lacks the token cannot make replicas reload; a server without an admin token follows
nothing. A record already on disk when a replica loads counts as acted on, so a replica started
after a later ``add-domain`` does not reload again and again. A plain ``add-domain`` without a
hot-plug changes nothing that is served.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

PLUGGED = Path("serve") / "plugged.json"
FOLLOW_EVERY_S = 2.0


class OutsideRootsError(PermissionError):
    """The folder is not under any root the server was started with (HTTP 403)."""


def inside_roots(run_dir: str, roots: list[str]) -> Path:
    path = Path(run_dir).expanduser().resolve()
    for root in map(Path, roots):
        if path == root or root in path.parents:
            return path
    raise OutsideRootsError(f"run_dir {run_dir!r} is not under a folder this server was started with")


@dataclass
class Loaded:
    """One model with its tokenizer; replaced whole by a hot-plug, never changed in place."""
    model: object
    tokenizer: object
    experts: list[str]
    source: str
    manifest_sha256: str = ""               # of the run folder's manifest.json when it was read
    loaded_at: float = field(default_factory=time.time)
    plug_on_disk: str | None = None         # the signature of RUN/serve/plugged.json when it was read


class Composition:
    """What the multiplexed cache holds for one served name. ``current`` is swapped atomically:
    a batch takes it once when it starts, so requests in flight finish on what they started with."""

    def __init__(self, name: str, loaded: Loaded):
        self.name, self.current = name, loaded
        self.checked_at, self.reloading = time.monotonic(), False
        self.followed, self.complained = loaded.plug_on_disk, None   # the last plug acted on; the last log line

    def swap(self, loaded: Loaded) -> Loaded:
        previous, self.current = self.current, loaded
        return previous

    def due(self) -> bool:
        """Time to read the folder's plug record again (at most every ``FOLLOW_EVERY_S``, never while
        a reload is under way)? No I/O: the event loop asks this on every request."""
        now = time.monotonic()
        if self.reloading or not self.current.manifest_sha256 or now - self.checked_at < FOLLOW_EVERY_S:
            return False
        self.checked_at = now
        return True


def load(source: str, *, is_run: bool, fold: bool = False) -> Loaded:
    """A run folder through ``load_composition`` (lineage and base checked), or a base model alone;
    over the replica's one copy of the base weights, and in serving form (``experts/serving.py``;
    ``fold``: the universal expert merged into a new W0 of its own)."""
    from ..compose import MANIFEST, Manifest, load_composition
    from ..experts import spec_of
    from ..experts.serving import serving_form
    from ..models import load_base

    if not is_run:
        model, tokenizer = load_base(source, share=True)
        return Loaded(model, tokenizer, [], source)
    raw = (Path(source) / MANIFEST).read_bytes()  # read once: the digest names exactly what is loaded
    digest, on_disk = hashlib.sha256(raw).hexdigest(), _signature_on_disk(source)
    model, tokenizer = load_composition(source, manifest=Manifest.read(source, raw), share_base=True)
    experts = spec_of(model).routed_names() if getattr(model, "modula_spec", None) is not None else []
    serving_form(model, fold=fold)
    return Loaded(model, tokenizer, list(experts), source, digest, plug_on_disk=on_disk)


def _sign(record: dict, secret: str) -> str:
    fields = {k: record[k] for k in ("manifest_sha256", "plugged_at", "experts")}
    return hmac.new(secret.encode(), json.dumps(fields, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def record_plug(loaded: Loaded, secret: str) -> str:
    """Tell the other replicas serving this folder what is now live; returns the record's signature."""
    from ..fileio import atomic_write_json

    record = {"manifest_sha256": loaded.manifest_sha256, "plugged_at": time.time(), "experts": loaded.experts}
    record["signature"] = _sign(record, secret)
    atomic_write_json(Path(loaded.source) / PLUGGED, record)
    return record["signature"]


def _signature_on_disk(source: str) -> str | None:
    try:
        return json.loads((Path(source) / PLUGGED).read_text()).get("signature")
    except (OSError, ValueError, AttributeError):
        return None


def plugged_elsewhere(composition: Composition, secret: str | None) -> bool:
    """Whether the folder holds a plug, signed with ``secret``, that this composition has not acted on
    and that names another manifest than the one it holds. Blocking file I/O: call it off the loop."""
    current = composition.current
    path = Path(current.source) / PLUGGED
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as error:
        return _ignore(composition, f"{path} is not readable JSON ({error})")
    try:
        signature = record["signature"]
        valid = bool(secret) and hmac.compare_digest(str(signature), _sign(record, secret))
    except (KeyError, TypeError) as error:
        return _ignore(composition, f"{path} is not a plug record (missing {error})")
    if not valid:
        reason = "this server has no admin token to check it with" if not secret else "its signature does not match"
        return _ignore(composition, f"{path} is not followed: {reason}")
    if signature == composition.followed:
        return False
    composition.followed = signature
    return record["manifest_sha256"] != current.manifest_sha256


def _ignore(composition: Composition, problem: str) -> bool:
    if problem != composition.complained:
        composition.complained = problem
        print(f"hot-plug record ignored for {composition.name}: {problem}", flush=True)
    return False
