"""The ``joint`` stage on the mixed data (general + every domain): every part of the method trains
together, and is saved.

``lora``    one LoRA (stored as the universal part), from scratch.
``molora``  every expert and the router, from scratch; adding a domain retrains all of them.
``mode``    the stage-2 experts (loaded) and the gates, fine-tuned together; with
            ``stages.joint.only_router`` the experts stay as stage 2 left them and only the gates train.
"""
from ..task import PartRef, RunContext, StageTask


def tasks(run: RunContext, domains: list[str]) -> list[StageTask]:
    method, plan = run.config.method_class, run.config.plan
    trained_before = "experts" in plan[:plan.index("joint")]  # the experts come from stage 2
    experts = [PartRef("domain", run.path("experts", d), d) for d in run.domains] if "domain" in method.parts else []
    only_router = run.config.stages.joint.only_router
    save = [PartRef("universal", run.path("universal"))] if "universal" in method.parts else []
    save += [] if only_router else experts
    if "router" in method.parts:
        save.append(PartRef("router", run.path("router")))
    return [run.task("joint", "router" if only_router else "joint", domains=run.domains,
                     data_domains=[run.config.data.general_domain] + run.domains,
                     stage_config=run.config.stage("joint"), load=experts if trained_before else [], save=save)]
