"""The mistake a learner can fix: a configuration, a command or a DeepSpeed JSON that cannot run as asked."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run as asked; the message lists every problem and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("This training configuration cannot run:\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # raised in the predictor's worker processes and pickled back whole
        return type(self), (self.problems,)
