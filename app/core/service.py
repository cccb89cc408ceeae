"""What one server's fronts share, typed: the settings (resolved once, by the app factory), the metrics, the worker
group it belongs to, its keys, and, once the lifespan has loaded the model, the data plane and the model
repository. The app factory makes it; the middleware, the routes (through app.http.deps) and the gRPC servicer
receive it, and none looks state up by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.core.auth import Keys
from app.core.dataplane import DataPlane
from app.core.repository import ModelRepository
from app.errors import NotReady
from app.observability.metrics import ServiceMetrics
from app.settings import Settings
from app.workers import WorkerGroup


@dataclass
class Service:
    settings: Settings
    metrics: ServiceMetrics
    workers: WorkerGroup  # a group of one when serving alone
    keys: Keys  # which keys open inference and model control, on every front
    dataplane: DataPlane | None = None  # None until the lifespan has loaded the model
    repository: ModelRepository | None = None

    def serving(self) -> DataPlane:
        """The data plane; NotReady while the model is loading."""
        if self.dataplane is None:
            raise NotReady()
        return self.dataplane

    def models(self) -> ModelRepository:
        """The model repository; NotReady while the model is loading."""
        if self.repository is None:
            raise NotReady()
        return self.repository
