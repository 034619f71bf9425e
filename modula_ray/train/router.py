"""Stage 3 (``router``): stack the trained experts and train only the router(s) on mixed data.

The data mix is the composition's domains plus the general domain, weighted by
``stages.router.data_weights`` (default: as built). Saves ``RUN_DIR/router``.
"""
from .task import PartRef, RunContext, StageTask


def router_task(run: RunContext) -> StageTask:
    parts = [PartRef("universal", run.path("universal"))]
    parts += [PartRef("domain", run.path("experts", d), d) for d in run.domains]
    return run.task("router", "router", domains=run.domains,
                    data_domains=run.domains + [run.config.data.general_domain],
                    stage_config=run.config.stage("router"), load=parts,
                    save=[PartRef("router", run.path("router"))])
