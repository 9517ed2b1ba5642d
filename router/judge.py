"""The gate's judge: the gateway's routing of one draft, rebuilt wherever a gate runs.

The distillation gate replays routing on held-out drafts (router/replay.py). For the loop inside
the gateway and `python -m distill_loop run` to reach the same decision on the same records,
both build the judge here from the same sources: the router's config, the persisted default
policy (the policy book's file, not a process's memory), and the serving version's stored
calibrator. A target-rate policy's live threshold exists only in a gateway's memory, so it
is judged at the threshold it starts from. The learned router is not replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

from models import Generation
from router.audited import Where
from router.base import Router
from router.calibrate import Calibrator
from router.config import RouterConfig
from router.policy import DEFAULT_TENANT, PolicyBook
from router.threshold import ConfidenceRouter


@dataclass(frozen=True, slots=True)
class Judge:
    """The router's confidence in a draft and the threshold the default tenant is routed with."""

    router: Router
    threshold: float

    def __call__(self, draft: Generation) -> tuple[float, float]:
        return self.router.decide(draft, self.threshold).confidence, self.threshold


@dataclass(frozen=True, slots=True)
class JudgeSource:
    """Where a judge comes from: built once from settings (`SharedSettings.judge_source`)."""

    config: RouterConfig
    policy_db: Where  # a SQLite file, or the shared database's URL
    calibrated: bool  # tuning.calibrate: route on each version's stored calibrator

    def judge(self, calibrator: Calibrator) -> Judge:
        """A judge for the version `calibrator` was fitted on. Reads the policy file (blocking)."""
        router = ConfidenceRouter.from_config(self.config)
        if self.calibrated:
            router.calibrator = calibrator
        book = PolicyBook.load(self.policy_db, self.config.threshold)
        book.close()
        return Judge(router, book.threshold(DEFAULT_TENANT))
