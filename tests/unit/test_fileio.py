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


def test_a_staged_copy_replaces_the_folder_whole_or_not_at_all(tmp_path):
    import pytest

    from modula_ray.fileio import staged_copy

    run = tmp_path / "run"
    (run / "part").mkdir(parents=True)
    (run / "part" / "w").write_text("old")
    (run / "manifest").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_copy(run, "adding-x") as staging:
            (staging / "manifest").unlink()
            (staging / "manifest").write_text("half")  # a new file, never the old one edited
            raise RuntimeError("a stage failed")
    assert (run / "manifest").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with staged_copy(run, "adding-x") as staging:
        (staging / "manifest").unlink()
        (staging / "manifest").write_text("new")
        assert (run / "manifest").read_text() == "old"  # nothing shows until the swap
    assert (run / "manifest").read_text() == "new" and (run / "part" / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
