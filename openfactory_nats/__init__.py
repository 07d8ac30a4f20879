"""Publish to NATS clusters from blocking code, reliably and fast."""

from ._blocking.facade import SyncNatsCluster
from ._core.cluster import DEFAULT_MAX_PENDING_BYTES, NatsCluster
from ._core.lifecycle import ClusterState
from ._errors import (
    BucketNotFoundError,
    BufferFullError,
    ClusterClosedError,
    ClusterTimeoutError,
    ClusterUnavailableError,
    ConnectError,
    ConnectTimeoutError,
    ConsumerNotFoundError,
    InvalidMessageError,
    InvalidTypeError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    MsgAlreadyAckedError,
    NatsClusterError,
    NoRespondersError,
    PublishError,
    RefusedError,
    RevisionMismatchError,
    ServiceError,
    StreamNotFoundError,
    SubscriptionClosedError,
    SubscriptionModeError,
    WrongThreadError,
)
from ._filters import validate_filter
from ._jetstream.aio import AsyncConsumer, AsyncJetStream, AsyncPullSubscription
from ._jetstream.api import ConsumerInfo, StreamInfo
from ._jetstream.consume import Consumer
from ._jetstream.handle import JetStream, PullSubscription
from ._jetstream.kv import Entry
from ._jetstream.kv_aio import AsyncKeyValue, AsyncWatch
from ._jetstream.kv_sync import KeyValue, Watch
from ._jetstream.msg import AsyncJsMsg, JsMsg, Metadata, SequencePair
from ._message import Msg
from ._receive.discovery import ServiceInstance
from ._receive.dispatcher import Dispatcher
from ._receive.service import Endpoint, Service, ServiceGroup
from ._receive.subscription import AsyncSubscription, Subscription
from ._routing.ring import HashRing
from ._routing.router import ClusterRouter, SyncClusterRouter, clusters_from_env
from ._send.acked import PubAck
from ._wire import validate_subject

__version__ = "0.2.0"

__all__ = (
    "AsyncKeyValue",
    "AsyncWatch",
    "BucketNotFoundError",
    "Entry",
    "KeyExistsError",
    "KeyNotFoundError",
    "KeyValue",
    "RevisionMismatchError",
    "Watch",
    "AsyncConsumer",
    "AsyncJetStream",
    "AsyncJsMsg",
    "AsyncPullSubscription",
    "Consumer",
    "ConsumerInfo",
    "ConsumerNotFoundError",
    "JetStream",
    "JetStreamError",
    "JsMsg",
    "Metadata",
    "MsgAlreadyAckedError",
    "PullSubscription",
    "SequencePair",
    "StreamInfo",
    "StreamNotFoundError",
    "DEFAULT_MAX_PENDING_BYTES",
    "AsyncSubscription",
    "Dispatcher",
    "Msg",
    "NoRespondersError",
    "RefusedError",
    "Endpoint",
    "Service",
    "ServiceError",
    "ServiceGroup",
    "ServiceInstance",
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
