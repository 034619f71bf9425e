"""Stage 1 (``universal``): train the universal expert on the general mix; nothing else is active.

Forward ``W0 x + s* B* A* x``; saves ``RUN_DIR/universal``.
"""
from ..task import PartRef, RunContext, StageTask


def tasks(run: RunContext, domains: list[str]) -> list[StageTask]:
    general = run.config.data.general_domain
    return [run.task("universal", "universal", domains=run.domains, data_domains=[general],
                     stage_config=run.config.stage("universal"), save=[PartRef("universal", run.path("universal"))])]
