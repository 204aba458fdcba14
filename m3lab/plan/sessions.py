"""A run that may outlast a session: how often it saves, how long it takes, how many sessions it
needs and the step each one goes on from.

The time is ``m3lab.predict.steptime``'s range over the run's optimizer steps; the plan takes the slow end,
so that a checkpoint lands at least every ``CHECKPOINT_EVERY_S`` of training (and halfway through a
shorter run: a session can end early) and no session is planned past its end. Where the card has no time estimate, a checkpoint lands every
``1 / CHECKPOINTS_WITHOUT_ESTIMATE`` of the run instead, and the plan says so. Each session keeps ``SESSION_SETUP_S`` for installing, loading the model and
resuming. A checkpoint is the model's weights as the run holds them and the optimizer's states
(HF Trainer and DeepSpeed save both, to go on exactly where they stopped), estimated from the
prediction's figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from m3lab.plan.platforms import GB, Platform
from m3lab.predict.steptime import StepTime

CHECKPOINT_EVERY_S = 30 * 60  # at most this much training is lost when a session ends
SESSION_SETUP_S = 30 * 60  # of each session: the install cell, the model's download and load, the resume
KEEP_CHECKPOINTS = 1  # HF writes the next before deleting the last: two on disk for a while
CHECKPOINTS_WITHOUT_ESTIMATE = 10  # a run on a card without a step-time estimate saves ten times


@dataclass(frozen=True)
class SessionPlan:
    """How a run of ``steps`` optimizer steps fits a platform's sessions."""

    steps: int
    steps_per_epoch: int
    epochs: float
    time: StepTime | None  # one step's estimated time (None: no estimate for this card)
    save_steps: int
    checkpoint_bytes: int  # one checkpoint, estimated
    session_hours: float | None  # the platform's longest session (None: not limited)
    weekly_gpu_hours: float | None = None  # the GPU time the platform allows a week (None: none published)
    storage_bytes: int | None = None  # what the place that outlives a session holds (None: not known)
    storage_place: str = ""

    @property
    def seconds(self) -> tuple[float, float] | None:
        """(fastest, slowest) estimated seconds for the whole run."""
        return self.time.seconds_for(self.steps) if self.time else None

    @property
    def steps_per_session(self) -> int | None:
        """Steps the slow estimate fits in a session, after its setup (None: not limited or unknown)."""
        if self.session_hours is None or self.time is None:
            return None
        return max(1, int((self.session_hours * 3600 - SESSION_SETUP_S) / self.time.slowest_seconds))

    @property
    def sessions(self) -> int:
        per_session = self.steps_per_session
        return 1 if per_session is None else math.ceil(self.steps / per_session)

    def resume_steps(self) -> list[int]:
        """The step each later session goes on from: the last checkpoint before the previous one ended."""
        per_session = self.steps_per_session
        if per_session is None:
            return []
        starts, done = [], 0
        while done + per_session < self.steps:
            done = (done + per_session) // self.save_steps * self.save_steps
            starts.append(done)
        return starts

    def describe(self) -> list[str]:
        """The plan in lines, each figure labelled as estimated."""
        lines = [f"{self.steps} optimizer steps: {self.epochs:g} epoch(s) of {self.steps_per_epoch} steps on this data"]
        if self.seconds is not None:
            fast, slow = self.seconds
            lines.append(f"training time, estimated: {duration_range(fast, slow)}")
        if self.session_hours is not None and self.time is not None:
            resumes = self.resume_steps()
            lines.append(f"sessions, at the slow estimate: {self.sessions} of at most {self.session_hours:g} h (each "
                         f"keeps {SESSION_SETUP_S // 60} min to set up)"
                         + (f"; later ones resume from step {', '.join(str(s) for s in resumes)}" if resumes else ""))
        if self.weekly_gpu_hours is not None and self.seconds is not None:
            used = self.sessions * SESSION_SETUP_S + self.seconds[1]
            lines.append(f"GPU time a week: about {self.weekly_gpu_hours:g} h allowed; this run takes {_duration(used)} "
                         "of it at the slow estimate, set-up included")
        cadence = (f"at most {CHECKPOINT_EVERY_S // 60} min of training at the slow estimate, and halfway at the latest"
                   if self.time is not None
                   else f"a {CHECKPOINTS_WITHOUT_ESTIMATE}th of the run: no step-time estimate for this card")
        size = f"{self.checkpoint_bytes / GB:.1f}" if self.checkpoint_bytes >= GB / 10 else f"{self.checkpoint_bytes / GB:.2f}"
        room = (f" ({2 * self.checkpoint_bytes / self.storage_bytes:.0%} of the {self.storage_bytes / GB:.0f} GB "
                f"{self.storage_place} holds)" if self.storage_bytes else "")
        lines.append(f"a checkpoint every {self.save_steps} steps ({cadence}), the last {KEEP_CHECKPOINTS} kept: about "
                     f"{size} GB each, estimated, two on disk while the next is written{room}")
        return lines


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def duration_range(fast: float, slow: float) -> str:
    """"58 min to 1.6 h": an estimate's range, each end in minutes below an hour, else hours."""
    return f"{_duration(fast)} to {_duration(slow)}"


def checkpoint_bytes(report) -> int:
    """One checkpoint, estimated from the prediction: the weights as the run holds them, and the
    optimizer's states of every rank that holds a part of them (ZeRO partitions them; without it
    rank 0 saves the one copy). Under LoRA FlagEmbedding's save writes the adapter and the two heads,
    not the frozen encoder: the weights' share that trains."""
    ranks = report.per_rank
    states = [r.model_state_bytes.optimizer_states + r.model_state_bytes.offloaded_optimizer_states
              for r in ranks]
    partitioned = report.spec is not None and (report.spec.zero_stage or 0) >= 1
    model = ranks[0].model_state_bytes
    weights = model.weights * model.trainable_params // model.params if report.spec is not None and report.spec.lora else model.weights
    return weights + (sum(states) if partitioned else states[0])


def plan(config, report, records: int, platform: Platform, time: StepTime | None) -> SessionPlan:
    """The plan of ``config`` (as predicted in ``report``) over ``records`` lines of data on ``platform``."""
    per_epoch, steps = config.steps_per_epoch(records), config.optimizer_steps(records)
    if time is None:
        every = max(1, steps // CHECKPOINTS_WITHOUT_ESTIMATE)
    else:
        # at least halfway too: a session can end early (Colab ends idle or busy sessions before 12 h), and
        # a run shorter than half an hour would otherwise save only at its end
        every = max(1, min(-(-steps // 2), int(CHECKPOINT_EVERY_S / time.slowest_seconds)))
    return SessionPlan(steps, per_epoch, config.num_train_epochs, time, every, checkpoint_bytes(report),
                       platform.session_hours, platform.weekly_gpu_hours, platform.storage_bytes, platform.storage_place)

