"""Publish to NATS clusters from blocking code, reliably and fast."""

from ._cluster import DEFAULT_MAX_PENDING_BYTES, NatsCluster
from ._dispatcher import Dispatcher
from ._errors import (
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    ConnectError,
    ConnectTimeoutError,
    InvalidMessageError,
    InvalidTypeError,
    NatsClusterError,
    NoRespondersError,
    PublishError,
    RefusedError,
    ServiceError,
    SubscriptionClosedError,
    SubscriptionModeError,
    WrongThreadError,
)
from ._filters import validate_filter
from ._jetstream import PubAck
from ._lifecycle import ClusterState
from ._message import Msg
from ._ring import HashRing
from ._router import ClusterRouter, SyncClusterRouter, clusters_from_env
from ._subscription import AsyncSubscription, Subscription
from ._sync import SyncNatsCluster
from ._wire import validate_subject

__version__ = "0.1.0"

__all__ = (
    "DEFAULT_MAX_PENDING_BYTES",
    "AsyncSubscription",
    "Dispatcher",
    "Msg",
    "NoRespondersError",
    "RefusedError",
    "ServiceError",
    "Subscription",
    "SubscriptionClosedError",
    "SubscriptionModeError",
    "validate_filter",
    "HashRing",
    "BufferFullError",
    "ClusterClosedError",
    "ClusterRouter",
    "ClusterState",
    "ClusterTimeoutError",
    "ClusterUnavailableError",
    "ConnectError",
    "ConnectTimeoutError",
    "InvalidMessageError",
    "InvalidTypeError",
    "NatsCluster",
    "NatsClusterError",
    "PubAck",
    "PublishError",
    "SyncClusterRouter",
    "SyncNatsCluster",
    "WrongThreadError",
    "__version__",
    "clusters_from_env",
    "validate_subject",
)
