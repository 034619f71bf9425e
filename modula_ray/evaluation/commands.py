"""``modula-ray eval RUN_DIR [RUN_DIR ...] --suite heldout|mc|routing|specialisation|domain|general|judge|all[,...]``.

With ``RAY_ADDRESS`` naming a cluster and several runs, each run is evaluated by its own Ray task
(``modula_ray.cli``: this package stays Ray-free).

``heldout``: the held-out response loss of each test row, nats and scored bytes
(``RUN/eval/heldout.json``; what ``experiment paper`` bootstraps its intervals from). ``mc``:
multiple-choice accuracy item by item on the held-out MMLU items of the run's domains (or
``--domains``) and of general MMLU (``RUN/eval/mc.json``). ``routing``: the mean gate per routed
expert on each domain's prompts, and routing accuracy on domain tokens per token and per sequence
(``RUN/eval/routing.json``). ``specialisation``: each routed expert alone (router bypassed) on each
domain's held-out rows (``RUN/eval/specialisation.json``).
``domain`` / ``general``: the lm-eval suites (``run.suite_tasks()``) over each composition and its
base model, merged into ``RUN/eval/results.json``; then ``RUN/eval/report.md`` (and, for several
runs, a side-by-side report at ``--report``). ``judge``: the composition's and the base model's
answers to the held-out e-commerce generation items, scored by a judge endpoint
(``MODULA_RAY_JUDGE_URL``/``_MODEL``/``_KEY``; default ``modula-ray serve --base smollm2-135m``
on 127.0.0.1:8000). ``all``: every suite. ``--list-tasks``: the task folder and its tasks, groups
and suites.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError

SUITES = ("heldout", "mc", "routing", "specialisation", "domain", "general", "judge", "all")
LOCAL = ("heldout", "mc", "routing", "specialisation")  # computed here, not through lm-eval; no report of their own


def _heldout(run_dir, args) -> None:
    from .heldout import run_heldout, save_heldout

    result = run_heldout(run_dir, rows=args.rows)
    path = save_heldout(Path(run_dir) / "eval", result)
    print(f"held-out response loss (nats per byte), first {args.rows} test rows per domain: "
          + ", ".join(f"{d} {v['nll_per_byte']:.4f}" for d, v in result["domains"].items()))
    print(f"saved {path}")


def _mc(run_dir, args) -> None:
    from .multiple_choice import GENERAL, run_mc, save_mc

    domains = args.domains.split(",") if args.domains else None
    result = run_mc(run_dir, rows=args.rows, domains=domains)
    path = save_mc(Path(run_dir) / "eval", result)
    scores = [f"{d} {v['accuracy']:.3f} ({v['calibrated_accuracy']:.3f} calibrated) of {len(v['ids'])}"
              for d, v in result["domains"].items()]
    print(f"multiple-choice accuracy, up to {args.rows} held-out items per domain ({GENERAL}: MMLU outside every "
          f"domain): {', '.join(scores)}")
    print(f"saved {path}")


def _routing(run_dir, args) -> None:
    from .routing import format_routing, routing_tables, save_routing

    table, layers = routing_tables(run_dir, split=args.split, rows=args.rows, progress=not args.json)
    if not table:
        print(f"{run_dir}: this composition has no router, so there is no routing table")
        return
    path = save_routing(run_dir, table, split=args.split, rows=args.rows, layers=layers)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"mean routing weight per expert, {args.rows} {args.split} prompts per domain (* = largest):")
    print(format_routing(table))
    print("routing accuracy (share of tokens whose largest gate is the domain's own expert): "
          + ", ".join(f"{d} {v['accuracy']:.2f}" for d, v in layers["domains"].items()))
    print("on domain tokens (prompt body and response), per token / per sequence: "
          + ", ".join(f"{d} {v['token_accuracy']:.2f}/{v['sequence_accuracy']:.2f}"
                      for d, v in layers["domain_tokens"].items()))
    for domain, measured in layers["domain_tokens"].items():
        if len(measured["by_kind"]) > 1:
            print(f"  {domain} per sequence, by kind of row: " + ", ".join(
                f"{kind} {v['sequence_accuracy']:.2f} of {v['rows']}" for kind, v in measured["by_kind"].items()))
    print(f"saved {path}")


def _specialisation(run_dir, args) -> None:
    from .specialisation import format_specialisation, save_specialisation, specialisation_matrix

    result = specialisation_matrix(run_dir, split="test", rows=args.rows)
    if not result:
        print(f"{run_dir}: this composition has no router, so no expert can be forced alone")
        return
    path = save_specialisation(run_dir, result)
    print(f"held-out response loss (nats per byte), {args.rows} test rows per domain, each expert forced "
          f"alone (* = the row's minimum):")
    print(format_specialisation(result))
    print(f"saved {path}")


def _suites(text: str) -> list[str]:
    import argparse

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite {unknown or text!r}; choose from {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def evaluate_run(run_dir, args) -> None:
    """Every suite of ``args.suite`` on one run folder, then its ``report.md`` (printed)."""
    import logging

    from .report import save_results, write_report
    from .run import run_suite, suite_tasks

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # progress bars stay; per-task chatter goes
    if getattr(args, "unsafe", False):  # here, and in a cluster's Ray task, which gets the same args
        from .sandbox import UNSAFE_ENV

        os.environ[UNSAFE_ENV] = "unsafe"
    tasks = suite_tasks()
    suites = [*LOCAL, *tasks, "judge"] if "all" in args.suite else args.suite
    for suite in suites:
        if suite in LOCAL:
            {"heldout": _heldout, "mc": _mc, "routing": _routing, "specialisation": _specialisation}[suite](run_dir, args)
            continue
        if suite == "judge":
            from .judges.client import JudgeConfig
            from .judges.suite import run_judge_suite

            flags = {"base_url": args.judge_url, "model": args.judge_model, "concurrency": args.judge_concurrency}
            config = JudgeConfig.from_env(**{k: v for k, v in flags.items() if v is not None})
            print(f"{run_dir}: suite judge, judge {config.describe()}"
                  + (f", --limit {args.limit}" if args.limit else ""), flush=True)
            entry = run_judge_suite(run_dir, limit=args.limit, config=config, rubric_name=args.rubric)
            print(f"saved {save_results(run_dir, 'judge', entry)}")
            continue
        print(f"{run_dir}: suite {suite} ({', '.join(tasks[suite])})"
              + (f", --limit {args.limit}" if args.limit else ""), flush=True)
        print(f"saved {save_results(run_dir, suite, run_suite(run_dir, suite, limit=args.limit, seed=args.seed))}")
    if set(suites) - set(LOCAL):
        report = write_report([run_dir])
        print(report.read_text() if not args.json else "", end="")
        print(f"saved {report}")


def side_by_side(args) -> None:
    """Several runs, suites beyond routing: the side-by-side report."""
    from .report import write_report

    if len(args.runs) > 1 and set(args.suite) - set(LOCAL):
        out = Path(args.report or Path(args.runs[0]) / "eval" / "side-by-side.md")
        print(f"saved {write_report(args.runs, out)}")


def list_tasks() -> None:
    """The task folder (for ``lm_eval --include_path``), every task and group, and the suites."""
    from .run import read_task_yamls, suite_tasks, tasks_dir

    print(f"lm-eval tasks in {tasks_dir()}")
    for name, config in sorted(read_task_yamls().items()):
        print(f"  {name}" + (f" = {', '.join(config['task'])}" if "group" in config else ""))
    for suite, tasks in suite_tasks().items():
        print(f"--suite {suite}: {', '.join(tasks)}")


def cmd_eval(args) -> int:
    """In the calling process, one run after another (``modula_ray.cli`` spreads several runs over
    a cluster's nodes as Ray tasks when ``RAY_ADDRESS`` names one)."""
    if args.list_tasks:
        list_tasks()
        return 0
    if not args.runs:
        raise ConfigError("RUN_DIR", "name at least one run folder to evaluate (or --list-tasks)")
    for run_dir in args.runs:
        evaluate_run(run_dir, args)
    side_by_side(args)
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate finished run folders",
        description="Evaluate finished compositions. 'heldout': the held-out response loss of each test row "
                    "(RUN/eval/heldout.json). 'mc': multiple-choice accuracy on held-out MMLU items "
                    "(RUN/eval/mc.json). 'routing': the mean gate per routed expert on each "
                    "domain's prompts, and routing accuracy on domain tokens (RUN/eval/routing.json). "
                    "'specialisation': each routed expert alone on each domain's held-out rows "
                    "(RUN/eval/specialisation.json). 'domain' and 'general': the lm-eval suites of "
                    "eval/tasks over each composition and its base model (RUN/eval/results.json, "
                    "RUN/eval/report.md with the paper-style table). 'judge': rubric scores of the held-out "
                    "e-commerce generation items by a judge endpoint (MODULA_RAY_JUDGE_URL, _MODEL, _KEY; default: "
                    "modula-ray serve --base smollm2-135m on 127.0.0.1:8000). 'all': every suite.")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished run folders (hold manifest.json)")
    parser.add_argument("--list-tasks", action="store_true", help="print the lm-eval task folder, its tasks "
                                                                  "and groups, and each suite's tasks; then exit")
    parser.add_argument("--suite", type=_suites, default=["routing"], metavar="|".join(SUITES),
                        help="what to evaluate, one or a comma-separated list (default: routing)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval suites: the first N items of each task")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (default: 0)")
    parser.add_argument("--report", default=None, help="several runs: the side-by-side report's path "
                                                       "(default: FIRST_RUN/eval/side-by-side.md)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val",
                        help="routing: which split's prompts (default: val)")
    parser.add_argument("--rows", type=int, default=8,
                        help="heldout, mc, routing, specialisation: rows per domain (default: 8)")
    parser.add_argument("--domains", default=None, help="mc: a comma-separated list of domains to score (default: "
                                                         "the run's own and general_mmlu)")
    parser.add_argument("--json", action="store_true", help="routing: print the table as JSON")
    parser.add_argument("--judge-url", default=None, help="judge: an OpenAI-compatible base URL (else "
                                                          "MODULA_RAY_JUDGE_URL, else http://127.0.0.1:8000/v1); "
                                                          "its key only from MODULA_RAY_JUDGE_KEY")
    parser.add_argument("--judge-model", default=None, help="judge: the model to ask (else MODULA_RAY_JUDGE_MODEL, "
                                                            "else smollm2-135m)")
    parser.add_argument("--judge-concurrency", type=int, default=None, help="judge: requests at once (default 4)")
    parser.add_argument("--rubric", default="ecommerce_generation", help="judge: a rubric in eval/judges/")
    parser.add_argument("--unsafe", action="store_true",
                        help="humaneval: run candidates even where the code sandbox cannot make its jail (PID, mount "
                             "and network namespaces), with only its Python-level guard and rlimits; without it such "
                             "a machine refuses to run them")
    parser.add_argument("--cpus-per-run", type=float, default=1.0,
                        help="on a cluster (RAY_ADDRESS set, several runs): the CPUs of each run's Ray task")
    parser.set_defaults(func=cmd_eval)
