"""One file per stage; each has ``tasks(run, domains) -> [StageTask]`` (``domains``: the stage-2
experts to train; other stages ignore it and use the whole composition)."""
from . import experts, joint, router, universal

STAGE_TASKS = {"universal": universal.tasks, "experts": experts.tasks, "router": router.tasks, "joint": joint.tasks}
