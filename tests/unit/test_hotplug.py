"""Which plug records a replica follows: only those signed with its admin token, each once, and not
one that was already on disk when it loaded."""
import json
import time

from modula_ray.serve import hotplug
from modula_ray.serve.hotplug import PLUGGED, Composition, Loaded, plugged_elsewhere, record_plug

TOKEN = "admin-secret"


def composition(run_dir, sha="a" * 64) -> Composition:
    loaded = Loaded(model=None, tokenizer=None, experts=["math"], source=str(run_dir), manifest_sha256=sha,
                    plug_on_disk=hotplug._signature_on_disk(str(run_dir)))
    return Composition("run", loaded)


def test_a_signed_plug_is_followed_once(tmp_path):
    follower = composition(tmp_path)
    assert not plugged_elsewhere(follower, TOKEN)  # no record yet
    record_plug(Loaded(None, None, ["math", "finance"], str(tmp_path), "b" * 64), TOKEN)
    assert plugged_elsewhere(follower, TOKEN) and not plugged_elsewhere(follower, TOKEN)


def test_forged_malformed_and_unverifiable_records_are_ignored_with_one_log_line(tmp_path, capsys):
    follower = composition(tmp_path)
    path = tmp_path / PLUGGED
    path.parent.mkdir(parents=True)
    signed = {"manifest_sha256": "b" * 64, "plugged_at": time.time(), "experts": ["math", "finance"]}
    for content, said in [("[]", "not a plug record"), ("{not json", "not readable JSON"),
                          (json.dumps(signed), "not a plug record"),
                          (json.dumps(signed | {"signature": "0" * 64}), "signature does not match"),
                          (json.dumps(signed | {"signature": hotplug._sign(signed, "another token")}),
                           "signature does not match")]:
        path.write_text(content)
        assert not plugged_elsewhere(follower, TOKEN) and not plugged_elsewhere(follower, TOKEN)
        logged = capsys.readouterr().out
        assert logged.count("hot-plug record ignored") <= 1 and (said in logged or said in follower.complained)
    path.write_text(json.dumps(signed | {"signature": hotplug._sign(signed, TOKEN)}))
    assert not plugged_elsewhere(follower, None)  # no admin token: nothing can be verified, nothing followed
    assert plugged_elsewhere(follower, TOKEN)


def test_a_replica_started_after_the_plug_does_not_reload_for_it(tmp_path):
    record_plug(Loaded(None, None, ["math"], str(tmp_path), "b" * 64), TOKEN)
    late = composition(tmp_path, sha="c" * 64)  # the manifest moved on since (add-domain without a plug)
    assert all(not plugged_elsewhere(late, TOKEN) for _ in range(3))


def test_the_record_is_read_at_most_every_follow_interval(tmp_path, monkeypatch):
    follower = composition(tmp_path)
    follower.checked_at -= hotplug.FOLLOW_EVERY_S
    assert follower.due() and not follower.due()
    follower.checked_at -= hotplug.FOLLOW_EVERY_S
    follower.reloading = True
    assert not follower.due()
