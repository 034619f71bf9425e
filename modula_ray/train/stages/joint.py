"""The baselines' one ``joint`` stage on the mixed data (general + every domain): every part of
the method trains together, from scratch, and is saved.

``lora``    one LoRA (stored as the universal part).
``molora``  every expert and the router; adding a domain retrains all of them.
"""
from ..task import PartRef, RunContext, StageTask


def tasks(run: RunContext, domains: list[str]) -> list[StageTask]:
    parts = run.config.method_class.parts
    save = [PartRef("universal", run.path("universal"))] if "universal" in parts else []
    if "domain" in parts:
        save += [PartRef("domain", run.path("experts", d), d) for d in run.domains]
    if "router" in parts:
        save.append(PartRef("router", run.path("router")))
    return [run.task("joint", "joint", domains=run.domains,
                     data_domains=[run.config.data.general_domain] + run.domains,
                     stage_config=run.config.stage("joint"), save=save)]
