"""Stage 2 (``experts``): one domain expert per run, over the frozen universal expert.

Each task's model holds exactly one domain expert, so nothing else can change (not even
through weight decay). The universal expert is loaded from the run folder, never retrained,
and its sha256 is recorded in the expert's config.json (``metadata.universal_sha256``) so
stage 3 and ``load_composition`` can refuse an expert trained over another universal.
The launcher runs every domain's task at once, each on its own worker group; with
``stages.experts.together`` one task (key ``experts``) trains them all in one group
(``train/together.py``), and the manifest still records each ``experts/<domain>``.
"""
from ...compose import part_sha256
from ..task import PartRef, RunContext, StageTask


def tasks(run: RunContext, domains: list[str]) -> list[StageTask]:
    load, lineage = [], {}
    if "universal" in run.config.method_class.parts:
        load = [PartRef("universal", run.path("universal"))]
        lineage = {"universal_sha256": part_sha256(run.path("universal"))}
    if run.config.stages.experts.together and len(domains) > 1:
        return [run.task("experts", "experts", domains=domains, data_domains=domains,
                         stage_config=run.config.stage("experts"), load=load, metadata=lineage,
                         save=[PartRef("domain", run.path("experts", d), d) for d in domains])]
    return [run.task(f"experts/{domain}", "experts", domains=[domain], data_domains=[domain],
                     stage_config=run.config.stage("experts", domain), load=load,
                     save=[PartRef("domain", run.path("experts", domain), domain)], metadata=lineage)
            for domain in domains]
