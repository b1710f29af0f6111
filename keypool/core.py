"""What :class:`KeyPool` and :class:`AsyncKeyPool` share: every operation, written once as
a flow (see :mod:`keypool.flows`), over one process-local state. The sync pool runs the
flows with blocking calls, the async pool awaits them."""

from __future__ import annotations

from .flows.admin import AdminFlows
from .flows.call import CallFlows
from .flows.limits import LimitFlows
from .flows.read import ReadFlows
from .flows.report import ReportFlows

__all__ = ["PoolCore"]


class PoolCore(CallFlows, ReportFlows, AdminFlows, ReadFlows, LimitFlows):
    """State and operations shared by the sync and async pools."""
