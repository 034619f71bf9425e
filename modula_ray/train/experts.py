"""Stage 2 (``experts``): one domain expert per run, over the frozen universal expert.

Each task's model holds exactly one domain expert, so nothing else can change (not even
through weight decay). The universal expert is loaded from the run folder, never retrained.
The launcher runs every domain's task at once, each on its own worker group.
"""
from .task import PartRef, RunContext, StageTask


def expert_task(run: RunContext, domain: str) -> StageTask:
    return run.task(f"experts/{domain}", "experts", domains=[domain], data_domains=[domain],
                    stage_config=run.config.stage("experts", domain),
                    load=[PartRef("universal", run.path("universal"))],
                    save=[PartRef("domain", run.path("experts", domain), domain)])
