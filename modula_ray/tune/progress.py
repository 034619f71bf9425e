"""One line per trial report and per finished trial on the driver's terminal (Tune's own tables
are off: ``verbose=0``). A trial that ASHA stopped ends before its last step."""
from __future__ import annotations

from ray.tune import Callback


class TrialPrinter(Callback):
    def __init__(self, metric: str, total: int):
        self.metric, self.total, self.ended = metric, total, 0

    def _line(self, trial, result: dict) -> str:
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f"[tune] {trial.trial_id} step {result.get('step')} {self.metric} {shown} loss {result.get('loss', float('nan')):.4f}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("final_report"):  # the last one is the "finished" line
            print(self._line(trial, result), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        last = trial.last_result or {}
        how = "finished" if last.get("final_report") else "stopped by the scheduler"
        print(f"[tune] {trial.trial_id} {how} ({self.ended}/{self.total} ended this session): "
              f"{self._line(trial, last).split(' ', 2)[2]}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended += 1
        print(f"[tune] {trial.trial_id} failed ({self.ended}/{self.total}); see {trial.local_path}/error.txt",
              flush=True)
