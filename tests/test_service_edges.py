"""Edge cases of NATS services (ADR-32): replies that cannot be sent, validation, hostile
discovery replies, stop racing close."""

from __future__ import annotations

import pytest

from openfactory_nats import InvalidMessageError, SyncNatsCluster

pytestmark = pytest.mark.timeout(60)


def test_a_version_with_non_ascii_digits_is_refused(service: SyncNatsCluster) -> None:
    for version in ("1\u0663.0.0", "1.0.0-\u0663a", "1.0.0+\u0663"):
        with pytest.raises(InvalidMessageError):
            service.service("v", version)
