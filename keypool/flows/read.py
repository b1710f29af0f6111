"""Reading the pool: one key's stats, a snapshot, the providers, the server's clock."""

from __future__ import annotations

from ..errors import UnknownKey
from ..keyspace import providers_key
from ..ops import Cmd, Flow, Run
from ..protocol import Stats
from ..providers import normalize_provider
from ..stats import KeyStats, parse_stats_reply
from .register import RegisterFlows

__all__ = ["ReadFlows"]


class ReadFlows(RegisterFlows):
    def _stats_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        call = Stats((key_id,))
        found = parse_stats_reply(name, (yield Run(name, call)))
        if not found and (yield from self._recover_flow(name, key_id)):
            found = parse_stats_reply(name, (yield Run(name, call)))
        if not found:
            raise UnknownKey(f"no key {key_id!r} for provider {name!r}")
        return found[0]

    def _snapshot_flow(self, provider: object | None) -> Flow:
        if provider is not None:
            names = [normalize_provider(provider)]
        else:
            names = yield from self._providers_flow()
        out: list[KeyStats] = []
        for name in names:
            found = parse_stats_reply(name, (yield Run(name, Stats())))
            missing = {k for k, _ in self._state.held_keys(name)} - {s.key_id for s in found}
            if missing and (yield from self._recover_flow(name, *sorted(missing))):
                found = parse_stats_reply(name, (yield Run(name, Stats())))
            out.extend(found)
        return out

    def _providers_flow(self) -> Flow:
        found = set((yield Cmd("smembers", (providers_key(self.namespace),))))
        return sorted(found | self._state.held_providers())

    def _server_time_flow(self) -> Flow:
        seconds, micros = yield Cmd("time", ())
        return int(seconds) + int(micros) / 1_000_000
