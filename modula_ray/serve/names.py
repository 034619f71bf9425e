"""Names plugged through the admin endpoint, shared by every replica of one application and kept
when a replica restarts: a detached Ray actor per application (``modula-ray-plugged-<app>`` in the
``modula-ray`` namespace) maps each plugged name to its run folder.

Only the admin endpoint writes it (after its token and roots checks); a replica reads it when it
starts and, at most every ``REFRESH_S``, when asked for a name it does not know, so a name plugged
on one replica answers on every other. It lives as long as the Ray cluster (not across a restart
of the cluster itself).
"""
import ray

REFRESH_S = 2.0


@ray.remote(num_cpus=0)
class PluggedNames:
    def __init__(self):
        self.names: dict[str, str] = {}

    def put(self, name: str, run_dir: str) -> None:
        self.names[name] = run_dir

    def all(self) -> dict[str, str]:
        return dict(self.names)


def plugged_names(app_name: str):
    """The application's registry actor, made by the first replica that asks."""
    return PluggedNames.options(name=f"modula-ray-plugged-{app_name}", namespace="modula-ray", lifetime="detached",
                                get_if_exists=True).remote()
