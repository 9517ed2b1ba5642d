"""The composition root: `create_app(settings)` wires backends, router, store and metrics.

Lifespan owns everything long-lived: it opens the signal store, starts the tiers in the
background (so liveness answers while models load; readiness waits for both) and the active
labeler once both are up, and on shutdown stops the labeler, waits for in-flight audits and
labels, closes the tiers, then flushes the store.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from distill_loop import Listener, RuntimeConfig, SignalStore, teacher_usage_since
from gateway.cache import build_cache
from gateway.errors import install_handlers
from gateway.gc_tuning import release_gc, tune_gc
from gateway.labels import ActiveLabeler, HeldoutNeed
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.openapi import install_openapi
from gateway.routes import CHAT_PATHS, install_chat_routes, serve_chat
from gateway.routes import router as http_routes
from gateway.service import TieredService
from gateway.settings import Settings
from gateway.student import StudentManager
from gateway.tuning import Tuning
from gateway.usage import SharedUsage
from models import Backend, BackendError, build_backend
from router import DEFAULT_TENANT, AuditedTable, ConfidenceRouter, PolicyBook, is_url

log = logging.getLogger(__name__)

START_RETRY_S = 2.0


async def _tune_gc_when_ready(starters: list[asyncio.Task[None]], runtime: RuntimeConfig) -> None:
    """GC settings (gateway/gc_tuning.py) once both tiers are up, so loaded models are frozen too."""
    await asyncio.gather(*starters, return_exceptions=True)
    frozen = tune_gc(runtime.gc_freeze, runtime.gc_gen0_threshold)
    log.info("gc tuned: %d start-up objects frozen, gen0 threshold %d", frozen, gc.get_threshold()[0])


async def _label_when_ready(starters: list[asyncio.Task[None]], labeler: ActiveLabeler, service: TieredService) -> None:
    """Active labels start once both tiers are up: before that there is nothing to label."""
    started = await asyncio.gather(*starters, return_exceptions=True)
    if not any(isinstance(r, BaseException) for r in started):
        labeler.start(service.label)


async def _follow_shared_state(settings: Settings, policies: PolicyBook, limits: Limiter, metrics: Metrics) -> None:
    """Apply policy and limit changes made by other replicas (admin API, tools) within
    `sync.interval_s`: at once on a NOTIFY from the shared database, else when the poll sees
    the tables' stamps move. Only where they are shared (`signal.url`); a file is this
    process's own."""
    if not is_url(settings.policy_store):
        return
    listener = Listener(str(settings.policy_store))
    try:
        while True:
            await asyncio.to_thread(listener.wait, settings.sync.interval_s)
            try:
                if await asyncio.to_thread(policies.stale):
                    await asyncio.to_thread(policies.open)
                    metrics.threshold.set(policies.threshold(DEFAULT_TENANT))
                    log.info("per-tenant policies changed elsewhere; reloaded")
                if await asyncio.to_thread(limits.stale):
                    await asyncio.to_thread(limits.reload)
                    log.info("per-key limits changed elsewhere; reloaded")
            except Exception:  # noqa: BLE001 - the database being away must not stop following it
                log.warning("shared policies and limits: check failed; retrying", exc_info=True)
    finally:
        listener.close()


async def _share_usage(limits: Limiter, shared: SharedUsage, interval_s: float) -> None:
    """Every `interval_s`, while any limit is set: write this replica's usage per key and take
    the other replicas' (gateway/usage.py). What a failed exchange did not write stays with
    the limiter for the next one (or the last, at shutdown); the database being away never
    stops serving."""
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        if not limits.active:
            continue
        mine = limits.changes()
        try:
            rows = await asyncio.to_thread(shared.exchange, mine, limits.today())
        except Exception:  # noqa: BLE001 - psycopg's errors, and anything else the database says
            if not failing:
                log.warning("shared per-key usage: exchange failed; limits hold per replica until it works",
                            exc_info=True)  # fmt: skip
            failing = True
            continue
        if failing:
            log.info("shared per-key usage: exchanging again")
        failing = False
        limits.sent(mine)
        limits.take_others(rows)


async def _start_until_ready(name: str, backend: Backend, metrics: Metrics) -> None:
    """Start a tier, retrying while it is unreachable (a remote server still booting)."""
    while True:
        try:
            await backend.start()
        except BackendError as exc:
            log.warning("%s tier not ready yet: %s (retrying in %.0fs)", name, exc, START_RETRY_S)
            await asyncio.sleep(START_RETRY_S)
            continue
        metrics.ready.labels(name).set(1)
        log.info("%s tier ready: %s", name, backend.info.name)
        return


class GatewayApp(FastAPI):
    """The FastAPI app, but chat completions (the one hot route) go straight to their handler
    (`routes.serve_chat`); every other request takes FastAPI's way."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in CHAT_PATHS and scope["method"] == "POST":
            await serve_chat(self, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, student: Backend | None = None, teacher: Backend | None = None) -> FastAPI:
    """Build the app. Tests may inject backends; otherwise they come from settings."""
    metrics = Metrics()
    store = SignalStore(settings.signal, listener=metrics.on_signal_event)
    student = student or build_backend(settings.student, cache_dir=settings.runtime.cache_dir)
    teacher = teacher or build_backend(settings.teacher, cache_dir=settings.runtime.cache_dir)
    router = ConfidenceRouter.from_config(settings.router)
    policies = PolicyBook(settings.policy_store, settings.router.threshold)
    budget = settings.distill.label_budget_per_hour
    need = HeldoutNeed(settings.distill.holdout_fraction, settings.distill.gate.min_heldout)
    labeler = ActiveLabeler(budget, need=need) if budget > 0 else None

    def spent_since(since: float) -> dict[str, float]:
        usage = teacher_usage_since(store.db, since)
        return {tenant: settings.pricing.teacher.cost(p, c) for tenant, (p, c) in usage.items()}

    # Replicas on one database share each key's usage, earlier runs' spend today included
    # (gateway/usage.py); a lone process reads its own spend today back from its records.
    shared = SharedUsage(str(settings.policy_store)) if is_url(settings.policy_store) else None
    limits = Limiter(
        settings.limits,
        settings.pricing.teacher,
        table=AuditedTable(settings.policy_store, "limits"),
        metrics=metrics,
        spent_since=spent_since if shared is None else None,
    )
    cache = build_cache(settings)
    service = TieredService(
        settings,
        student,
        teacher,
        router,
        store,
        metrics,
        policies=policies,
        labeler=labeler,
        limits=limits,
        cache=cache,
    )
    tuning = Tuning(settings, router, policies)
    manager = StudentManager(settings, student, teacher, metrics, on_serving=tuning.on_serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if "local" in (settings.student.kind, settings.teacher.kind):
            import torch

            torch.set_num_threads(settings.runtime.torch_threads)
        await asyncio.to_thread(store.open)
        await asyncio.to_thread(policies.open)
        await asyncio.to_thread(limits.open)
        if cache is not None:
            await cache.open()
        metrics.threshold.set(policies.threshold(DEFAULT_TENANT))
        starters = [
            asyncio.create_task(_start_until_ready(name, backend, metrics), name=f"start-{name}")
            for name, backend in service.tiers.items()
        ]

        def on_started(_: asyncio.Task[None]) -> None:
            info = student.info
            metrics.set_student(info.version, info.name)

        starters[0].add_done_callback(on_started)
        gc_tuner = asyncio.create_task(_tune_gc_when_ready(starters, settings.runtime), name="tune-gc")
        waiters = [gc_tuner]
        if labeler is not None:
            waiters.append(asyncio.create_task(_label_when_ready(starters, labeler, service), name="start-labels"))
        await manager.start(starters[0])
        tuning.start(service.student_version)
        sync = asyncio.create_task(_follow_shared_state(settings, policies, limits, metrics), name="shared-state")
        usage = (
            asyncio.create_task(_share_usage(limits, shared, settings.sync.interval_s), name="shared-usage")
            if shared is not None
            else None
        )
        try:
            yield
        finally:
            app.state.shutting_down = True
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)
            if usage is not None and shared is not None:
                usage.cancel()
                await asyncio.gather(usage, return_exceptions=True)
                if limits.active:  # the last second's usage, for the replicas that go on
                    last = asyncio.to_thread(shared.exchange, limits.changes(), limits.today())
                    try:
                        await asyncio.wait_for(last, 5.0)
                    except Exception:  # noqa: BLE001 - shutting down regardless
                        log.warning("shared per-key usage: last exchange failed", exc_info=True)
                shared.close()
            policies.close()
            limits.close()
            if cache is not None:
                await cache.aclose()
            await tuning.stop()
            await manager.stop(settings.server.shutdown_grace_s)
            for task in (*starters, *waiters):
                task.cancel()
            await asyncio.gather(*starters, *waiters, return_exceptions=True)
            if labeler is not None:
                await labeler.stop()  # no new labels; those in flight are drained with the audits
            await service.drain(settings.server.shutdown_grace_s)
            for backend in service.tiers.values():
                try:
                    await backend.aclose()
                except Exception:  # noqa: BLE001 - closing one tier must not skip the store flush
                    log.exception("closing a tier failed")
            await asyncio.to_thread(store.close)
            release_gc()
            log.info("shutdown complete; signal queue flushed")

    app = GatewayApp(title="tiergate", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.students = manager
    app.state.tuning = tuning
    app.state.shutting_down = False
    app.state.api_key_digests = [
        hashlib.sha256(k.get_secret_value().encode()).digest() for k in settings.server.api_keys
    ]
    admin = settings.server.admin_api_key
    app.state.admin_key_digest = hashlib.sha256(admin.get_secret_value().encode()).digest() if admin else None
    install_handlers(app)
    app.include_router(http_routes)
    install_chat_routes(app)
    install_openapi(app, settings)
    return app
