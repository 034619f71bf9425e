"""Baselines in one ``joint`` stage on the mixed data (general + every domain).

``lora``    one LoRA (stored as the universal part).
``molora``  every expert and the router together, from scratch; adding a domain retrains all.
"""
from .task import PartRef, RunContext, StageTask


def joint_task(run: RunContext) -> StageTask:
    if run.config.method == "lora":
        save = [PartRef("universal", run.path("universal"))]
    else:
        save = [PartRef("domain", run.path("experts", d), d) for d in run.domains]
        save.append(PartRef("router", run.path("router")))
    return run.task("joint", "joint", domains=run.domains,
                    data_domains=[run.config.data.general_domain] + run.domains,
                    stage_config=run.config.stage("joint"), save=save)
