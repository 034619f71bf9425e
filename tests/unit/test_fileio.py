"""Atomic folder replacement: a reader sees the old or the new folder whole, at every instant."""
import threading

from modula_ray.fileio import _exchange, atomic_dir


def test_a_reader_never_finds_the_folder_missing_or_half_written(tmp_path):
    target = tmp_path / "router"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("version 0")
    seen, gaps, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.add((target / "weights").read_text())
            except FileNotFoundError:
                gaps.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 200):
            with atomic_dir(target) as tmp:
                (tmp / "weights").write_text(f"version {version}")
    finally:
        stop.set()
        reader.join(timeout=30)
    assert gaps == [] and (target / "weights").read_text() == "version 199"
    assert seen <= {f"version {v}" for v in range(200)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]  # no temporary or old folder left


def test_exchange_swaps_two_folders_on_linux(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("a"), (tmp_path / "b" / "f").write_text("b")
    assert _exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"
