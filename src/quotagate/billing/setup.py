"""Builds the billing parts from a started service and its PostgreSQL ledger."""

from __future__ import annotations

import logging

from quotagate.billing.gateway import StripeGateway
from quotagate.billing.service import Billing
from quotagate.billing.store import PaymentStore
from quotagate.service import QuotaService
from quotagate.store.postgres import PostgresLedger

log = logging.getLogger("quotagate.billing")


def create_billing(service: QuotaService, ledger: PostgresLedger) -> Billing:
    settings = service.settings
    if settings.stripe.enabled and not any(p.active for p in settings.packages):
        log.warning("stripe is enabled but no package is on sale: the purchase page lists none")
    store = PaymentStore(
        ledger.pool, notifications=settings.notifications.enabled, outbox_statuses=ledger.outbox_statuses
    )
    return Billing(service, store, StripeGateway(settings.stripe))
