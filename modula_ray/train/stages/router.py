"""Stage 3 (``router``): stack the trained experts and train only the router(s) on mixed data.

The data mix is the composition's domains plus the general domain, weighted by
``stages.router.data_weights`` (default: as built). Every expert must have been trained over
the universal expert in the run folder (checked here, before any Ray work). Saves ``RUN_DIR/router``.
"""
from ...compose import check_lineage
from ..task import PartRef, RunContext, StageTask


def tasks(run: RunContext, domains: list[str]) -> list[StageTask]:
    parts = [PartRef("universal", run.path("universal"))] if "universal" in run.config.method_class.parts else []
    parts += [PartRef("domain", run.path("experts", d), d) for d in run.domains]
    check_lineage(parts)
    return [run.task("router", "router", domains=run.domains,
                     data_domains=run.domains + [run.config.data.general_domain],
                     stage_config=run.config.stage("router"), load=parts,
                     save=[PartRef("router", run.path("router"))])]
