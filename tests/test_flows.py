"""The flows stepped by hand with canned replies: no store, no sockets.

Each test builds a :class:`PoolCore` on a ``memory://`` URL that is never opened, starts a
flow and plays the driver: it reads each op the flow yields, checks it to the argument,
and sends back a reply shaped like the script's (see the headers of ``lua/*.lua``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from keypool import ops, protocol
from keypool.classify import classify
from keypool.core import PoolCore
from keypool.errors import KeyPoolError, NoKeyAvailable, UnknownKey
from keypool.fingerprint import fingerprint
from keypool.keyspace import ProviderKeys, model_providers_key, providers_key
from keypool.kinds import ErrorKind
from keypool.local import Held
from keypool.providers import Provider
from keypool.settings import KeyPoolSettings

NS = "keypool"
SECRET_A = "sk-flow-test-secret-aaaaaaaaaaaa"
SECRET_B = "sk-flow-test-secret-bbbbbbbbbbbb"


@pytest.fixture
def core() -> PoolCore:
    return PoolCore(settings=KeyPoolSettings(redis_url="memory://x"))


def held(secret: str, *, models: set[str] | None = None, rpm: int = 0) -> Held:
    return Held(secret, fingerprint(secret), 1.0, rpm, 0, 0, 0, set(models or ()))


def start(flow: ops.Flow) -> ops.Op:
    return next(flow)


def finish(flow: ops.Flow, reply: Any) -> Any:
    """Send the last reply; the flow must end, and what it returns is returned."""
    with pytest.raises(StopIteration) as stop:
        flow.send(reply)
    return stop.value.value


def granted(key_id: str, secret: str, now_ms: int = 1_700_000_000_000) -> list[Any]:
    return ["OK", key_id, fingerprint(secret), "", now_ms]


def acquire_call(op: ops.Op, provider: str = "openai", **fields: Any) -> protocol.Acquire:
    """The op is a Run of acquire.lua for ``provider`` with exactly these fields (the call
    id, random, is taken from the op)."""
    assert isinstance(op, ops.Run)
    assert op.provider == provider and op.confirm is True
    assert isinstance(op.call, protocol.Acquire)
    want: dict[str, Any] = {
        "strategy": "round_robin",
        "tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "ttl_ms": 60_000,
        "model": "",
        "avoid": "",
        "epoch": "",
        "model_only": False,
        "unusable": "",
    }
    want.update(fields)
    assert op.call == protocol.Acquire(call_id=op.call.call_id, **want)
    assert op.call.call_id
    return op.call


def register_call(op: ops.Op, key_id: str, secret: str, **fields: Any) -> protocol.Register:
    assert isinstance(op, ops.Run) and op.provider == "openai"
    call = op.call
    assert isinstance(call, protocol.Register)
    want: dict[str, Any] = {
        "key_id": key_id,
        "fingerprint": fingerprint(secret),
        "weight": "1.0",
        "rpm": 0,
        "tpm": 0,
        "rpd": 0,
        "max_concurrency": 0,
        "sealed": "",
        "new_epoch": call.new_epoch,
        "models_json": "[]",
        "budgets_spent": False,
        "account": "",
    }
    want.update(fields)
    assert call == protocol.Register(**want)
    assert len(call.new_epoch) == 12
    return call


def index_op(*providers: str, models: dict[str, list[str]] | None = None) -> ops.CmdMany:
    cmds: list[tuple[str, tuple[Any, ...]]] = [("sadd", (providers_key(NS), *providers))]
    for model, names in (models or {}).items():
        cmds.append(("sadd", (model_providers_key(NS, model), *names)))
    return ops.CmdMany(cmds)


# ---------------------------------------------------------------------- register


def test_add_key_registers_and_indexes(core: PoolCore) -> None:
    flow = core._add_keys_flow(
        [(Provider.OPENAI, "team-a", SECRET_A)], 2.0, 60, None, None, 4, ["gpt-4o"], account="org-1"
    )
    register_call(
        start(flow),
        "team-a",
        SECRET_A,
        weight="2.0",
        rpm=60,
        max_concurrency=4,
        models_json='["gpt-4o"]',
        account="org-1",
    )
    assert flow.send(["e1", "created"]) == index_op("openai", models={"gpt-4o": ["openai"]})
    assert finish(flow, [1, 1]) == 1
    assert core._state.epoch("openai") == "e1"
    kept = core._state.held("openai", "team-a")
    assert kept is not None and kept.secret == SECRET_A and kept.models == {"gpt-4o"}


def test_add_keys_many_go_in_one_pipeline(core: PoolCore) -> None:
    flow = core._add_keys_flow(
        [("openai", "a", SECRET_A), ("anthropic", "b", SECRET_B)], 1.0, None, None, None, None, []
    )
    op = start(flow)
    assert isinstance(op, ops.RunMany)
    assert [(p, type(c), c.key_id) for p, c in op.calls] == [  # type: ignore[attr-defined]
        ("openai", protocol.Register, "a"),
        ("anthropic", protocol.Register, "b"),
    ]
    assert flow.send([["e1", "created"], ["e2", "updated"]]) == index_op("anthropic", "openai")
    assert finish(flow, [0]) == 2
    assert (core._state.epoch("openai"), core._state.epoch("anthropic")) == ("e1", "e2")


def test_same_secret_twice_in_one_call_is_refused_before_any_op(core: PoolCore) -> None:
    flow = core._add_keys_flow(
        [("openai", "a", SECRET_A), ("openai", "b", SECRET_A)], 1.0, None, None, None, None, []
    )
    with pytest.raises(ValueError, match="'a' and 'b'"):
        start(flow)


def test_register_duplicate_raises_naming_both_ids_and_forgets_the_key(core: PoolCore) -> None:
    flow = core._register_flow([("openai", "mine", held(SECRET_A))])
    register_call(start(flow), "mine", SECRET_A)
    assert core._state.held("openai", "mine") is not None  # held while the store is asked
    assert flow.send(["DUP", "other"]) == index_op("openai")
    with pytest.raises(ValueError) as exc:
        flow.send([1])
    assert "'mine'" in str(exc.value) and "'other'" in str(exc.value)
    assert SECRET_A not in str(exc.value)
    assert core._state.held("openai", "mine") is None
    assert core._state.epoch("openai") == ""


def test_register_duplicate_keeps_what_was_held_before(core: PoolCore) -> None:
    core._state.hold("openai", "mine", held(SECRET_A))
    flow = core._register_flow([("openai", "mine", held(SECRET_B))])
    register_call(start(flow), "mine", SECRET_B)
    flow.send(["DUP", "other"])
    with pytest.raises(ValueError, match="'other'"):
        flow.send([1])
    kept = core._state.held("openai", "mine")
    assert kept is not None and kept.secret == SECRET_A


def test_register_duplicate_from_the_environment_is_skipped(core: PoolCore) -> None:
    entry = held(SECRET_A)
    entry.keep_config = True
    flow = core._register_flow([("openai", "mine", entry)])
    register_call(
        start(flow), "mine", SECRET_A, weight="", rpm="", tpm="", rpd="", max_concurrency=""
    )
    flow.send(["DUP", "other"])
    assert finish(flow, [1]) is None
    assert core._state.held("openai", "mine") is None


def test_reregister_puts_back_held_keys_and_limits_budgets_spent(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A, rpm=5))
    limits = protocol.SetLimits("account", "org", "", (1, None, None, None, None, None, None))
    core._state.remember_limits("openai", ("account", "org", ""), limits)
    flow = core._reregister_flow("openai")
    register_call(start(flow), "a", SECRET_A, rpm=5, budgets_spent=True)
    assert flow.send(["e9", "created"]) == index_op("openai")
    assert flow.send([1]) == ops.Run("openai", limits)
    assert finish(flow, ["OK"]) is True
    assert core._state.epoch("openai") == "e9"


def test_reregister_budgets_full_when_configured() -> None:
    core = PoolCore(settings=KeyPoolSettings(redis_url="memory://x", restart_budgets="full"))
    core._state.hold("openai", "a", held(SECRET_A))
    register_call(start(core._reregister_flow("openai")), "a", SECRET_A, budgets_spent=False)


def test_reregister_with_nothing_held_yields_nothing(core: PoolCore) -> None:
    flow = core._reregister_flow("openai")
    with pytest.raises(StopIteration) as stop:
        next(flow)
    assert stop.value.value is False


# ---------------------------------------------------------------------- acquire


def test_acquire_ok_returns_picked_with_the_held_secret(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    core._state.set_epoch("openai", "e1")
    flow = core._acquire_flow("openai", "gpt-4o", "weighted", 10, None, True, input_tokens=3)
    call = acquire_call(
        start(flow), strategy="weighted", tokens=10, input_tokens=3, model="gpt-4o", epoch="e1"
    )
    picked = finish(flow, granted("a", SECRET_A))
    assert picked == ops.Picked("openai", "a", SECRET_A, call.call_id, "gpt-4o", 10, 3, 0)


def test_acquire_without_lease_asks_for_no_ttl(core: PoolCore) -> None:
    acquire_call(start(core._acquire_flow("openai", None, None, 0, None, False)), ttl_ms=0)


def test_acquire_lost_reregisters_then_retries_with_the_same_id(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    core._state.hold("openai", "b", held(SECRET_B))
    core._state.set_epoch("openai", "e1")
    flow = core._acquire_flow("openai", None, None, 0, None, True)
    first = acquire_call(start(flow), epoch="e1")
    again = flow.send(["LOST", "e2"])
    assert isinstance(again, ops.RunMany)
    regs = [c for _, c in again.calls]
    assert all(isinstance(c, protocol.Register) for c in regs)
    assert [(c.key_id, c.budgets_spent) for c in regs] == [("a", True), ("b", True)]  # type: ignore[attr-defined]
    assert {p for p, _ in again.calls} == {"openai"}
    assert flow.send([["e2", "created"], ["e2", "created"]]) == index_op("openai")
    retry = acquire_call(flow.send([1]), epoch="e2")
    assert retry.call_id == first.call_id
    picked = finish(flow, granted("b", SECRET_B))
    assert (picked.key_id, picked.secret, picked.lease_id) == ("b", SECRET_B, first.call_id)


def test_acquire_lost_with_one_key_registers_it_alone(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._acquire_flow("openai", None, None, 0, None, True)
    acquire_call(start(flow))
    register_call(flow.send(["LOST", ""]), "a", SECRET_A, budgets_spent=True)


def test_acquire_lost_holding_nothing_forgets_the_epoch(core: PoolCore) -> None:
    core._state.set_epoch("openai", "e1")
    flow = core._acquire_flow("openai", None, None, 0, None, True)
    acquire_call(start(flow), epoch="e1")
    acquire_call(flow.send(["LOST", "e2"]), epoch="")


def test_acquire_gives_up_when_the_state_keeps_changing(core: PoolCore) -> None:
    flow = core._acquire_flow("openai", None, None, 0, None, True)
    op = start(flow)
    for _ in range(3):
        op = flow.send(["LOST", "x"])
        acquire_call(op)
    with pytest.raises(KeyPoolError, match="keeps changing"):
        flow.send(["LOST", "x"])


def test_acquire_none_with_wait_sleeps_then_retries(core: PoolCore) -> None:
    flow = core._acquire_flow("openai", None, None, 0, 1.0, True)
    first = acquire_call(start(flow))
    sleep = flow.send(["NONE", 250, "rpm"])
    assert isinstance(sleep, ops.Sleep)
    assert sleep.seconds == pytest.approx(0.251)
    retry = acquire_call(flow.send(None))
    assert retry.call_id != first.call_id  # a new pick, a new lease id
    core._state.hold("openai", "a", held(SECRET_A))
    assert finish(flow, granted("a", SECRET_A)).key_id == "a"


def test_acquire_none_longer_than_the_wait_raises(core: PoolCore) -> None:
    flow = core._acquire_flow("openai", None, None, 0, 0.1, True)
    acquire_call(start(flow))
    with pytest.raises(NoKeyAvailable) as exc:
        flow.send(["NONE", 5000, "cooldown"])
    assert exc.value.retry_after == 5.0


def test_acquire_none_without_wait_raises_with_retry_after(core: PoolCore) -> None:
    flow = core._acquire_flow("openai", None, None, 0, None, True)
    acquire_call(start(flow))
    with pytest.raises(NoKeyAvailable) as exc:
        flow.send(["NONE", 250, "rpm"])
    assert exc.value.retry_after == 0.25
    assert exc.value.provider == "openai"
    assert "(rpm)" in str(exc.value)


def test_acquire_none_never_raises_retry_after_none(core: PoolCore) -> None:
    flow = core._acquire_flow("openai", None, None, 0, 5.0, True)
    acquire_call(start(flow))
    with pytest.raises(NoKeyAvailable) as exc:
        flow.send(["NONE", -1, "disabled"])
    assert exc.value.retry_after is None


def test_acquire_of_a_key_not_held_gives_it_back_and_marks_it_unusable(core: PoolCore) -> None:
    flow = core._acquire_flow("openai", None, None, 0, None, True)
    first = acquire_call(start(flow))
    give_back = flow.send(granted("elsewhere", SECRET_B))
    assert isinstance(give_back, ops.Run) and isinstance(give_back.call, protocol.Report)
    assert give_back.call == protocol.Report(
        call_id=first.call_id,
        key_id="elsewhere",
        outcome="release",
        leased=True,
        tokens=None,
        input_tokens=None,
        output_tokens=None,
        latency_ms=None,
        retry_after_ms=None,
        detail="",
        cooldowns=core._cooldowns,
    )
    # the ids this process cannot use go to a set of its own, written when they change ...
    write = flow.send(["OK", "", "", 0, 0])
    assert isinstance(write, ops.CmdMany)
    (_, (name,)), (_, (same, *ids)), (_, (again, ttl)) = write.cmds
    assert name == same == again and name.startswith(ProviderKeys(NS, "openai").key("u:"))
    assert (ids, ttl) == (["elsewhere"], 86400)
    # ... and the acquire names the set, one argument whatever the count
    retry = acquire_call(flow.send([1, 1, 1]), unusable=name.rsplit("u:", 1)[1])
    assert retry.call_id != first.call_id
    assert core._state.unusable("openai") == ["elsewhere"]
    assert core._state.unusable_set("openai")[1] is None  # not written again


def test_acquire_by_model_finds_its_providers(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A, models={"gpt-4o"}))
    flow = core._acquire_flow(None, "gpt-4o", None, 0, None, True)
    assert start(flow) == ops.Cmd("smembers", (model_providers_key(NS, "gpt-4o"),))
    # the providers found in the store and those of the keys held here, sorted
    acquire_call(flow.send({"anthropic"}), "anthropic", model="gpt-4o", model_only=True)
    op = flow.send(["NONE", 1000, "cooldown"])
    acquire_call(op, "openai", model="gpt-4o", model_only=True)
    assert finish(flow, granted("a", SECRET_A)).provider == "openai"
    assert core._state.providers_of_model("gpt-4o") == ("anthropic", "openai")


def test_acquire_checks_its_arguments_before_any_op(core: PoolCore) -> None:
    with pytest.raises(ValueError, match="invalid strategy"):
        start(core._acquire_flow("openai", None, "fastest", 0, None, True))
    with pytest.raises(ValueError, match="provider, or a model"):
        start(core._acquire_flow(None, None, None, 0, None, True))
    with pytest.raises(ValueError, match="tokens"):
        start(core._acquire_flow("openai", None, None, -1, None, True))


# ---------------------------------------------------------------------- report


def picked(key_id: str = "a", secret: str = SECRET_A) -> ops.Picked:
    return ops.Picked("openai", key_id, secret, "lease-1", None, 100)


def report_call(op: ops.Op, *, confirm: bool, **fields: Any) -> protocol.Report:
    assert isinstance(op, ops.Run) and op.provider == "openai" and op.confirm is confirm
    assert isinstance(op.call, protocol.Report)
    want: dict[str, Any] = {
        "call_id": "lease-1",
        "key_id": "a",
        "leased": True,
        "tokens": None,
        "input_tokens": None,
        "output_tokens": None,
        "latency_ms": None,
        "retry_after_ms": None,
        "detail": "",
        "cooldowns": (30_000, 600_000, 3_600_000, 3, 10_000, 300_000),
        "scope": "",
    }
    want.update(fields)
    assert op.call == protocol.Report(**want)
    return op.call


def test_success_report_need_not_wait_for_its_reply(core: PoolCore) -> None:
    flow = core._lease_report_flow(picked(), "success", tokens=120, latency=0.5)
    report_call(start(flow), confirm=False, outcome="success", tokens=120, latency_ms=500.0)
    assert finish(flow, None) is None


def test_release_report_need_not_wait_either(core: PoolCore) -> None:
    flow = core._lease_report_flow(picked(), "release", scope="model")
    report_call(start(flow), confirm=False, outcome="release", scope="model")


def test_failure_report_waits_for_its_reply(core: PoolCore) -> None:
    failure = classify(429, retry_after=12.5)
    flow = core._lease_report_flow(picked(), "rate_limit", failure=failure)
    report_call(
        start(flow),
        confirm=True,
        outcome="rate_limit",
        retry_after_ms=12_500,
        detail=failure.detail,
    )
    assert finish(flow, ["OK", "cooldown_set", "rate_limit", 1_700_000_012_500, 0]) is None


def test_failure_retry_after_is_clamped_to_max_cooldown() -> None:
    core = PoolCore(settings=KeyPoolSettings(redis_url="memory://x", max_cooldown=60.0))
    flow = core._lease_report_flow(picked(), "rate_limit", failure=classify(429, retry_after=1e6))
    op = start(flow)
    assert isinstance(op, ops.Run) and isinstance(op.call, protocol.Report)
    assert op.call.retry_after_ms == 60_000


def test_failure_report_on_unknown_recovers_then_reports_again(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    core._state.set_epoch("openai", "e1")
    failure = classify(500)
    flow = core._lease_report_flow(picked(), "server", failure=failure)
    report_call(start(flow), confirm=True, outcome="server", detail=failure.detail)
    assert flow.send(["UNKNOWN"]) == ops.Cmd("hget", (f"{NS}:{{openai}}:meta", "epoch"))
    register_call(flow.send(None), "a", SECRET_A, budgets_spent=True)  # the state was lost
    assert flow.send(["e2", "created"]) == index_op("openai")
    again = flow.send([1])
    report_call(again, confirm=True, outcome="server", leased=False, detail=failure.detail)
    assert finish(flow, ["OK", "", "", 0, 0]) is None
    assert core._state.epoch("openai") == "e2"


def test_failure_report_on_a_removed_key_forgets_it(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    core._state.set_epoch("openai", "e1")
    flow = core._lease_report_flow(picked(), "server", failure=classify(500))
    start(flow)
    flow.send(["UNKNOWN"])
    assert finish(flow, "e1") is None  # same epoch: an operator removed it
    assert core._state.held("openai", "a") is None


def test_success_report_on_unknown_does_not_recover(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._lease_report_flow(picked(), "success")
    start(flow)
    assert finish(flow, ["UNKNOWN"]) is None


def test_mark_carries_a_fresh_call_id_each_time(core: PoolCore) -> None:
    ids = []
    for _ in range(2):
        flow = core._mark_success_flow("openai", "a", 7, None)
        op = start(flow)
        assert isinstance(op, ops.Run) and isinstance(op.call, protocol.Report)
        call = report_call(
            op, confirm=True, call_id=op.call.call_id, outcome="success", leased=False, tokens=7
        )
        ids.append(call.call_id)
        assert finish(flow, ["OK", "", "", 0, 0]) is None
    assert ids[0] != ids[1] and "lease-1" not in ids


def test_mark_failure_returns_the_classified_failure(core: PoolCore) -> None:
    flow = core._mark_failure_flow("openai", "a", 401, None, None)
    op = start(flow)
    assert isinstance(op, ops.Run) and isinstance(op.call, protocol.Report)
    assert (op.call.outcome, op.call.leased) == ("auth", False)
    failure = finish(flow, ["OK", "key_disabled", "auth", -1, 0])
    assert failure.kind is ErrorKind.AUTH


def test_mark_on_a_key_nobody_holds_raises_unknown_key(core: PoolCore) -> None:
    flow = core._mark_success_flow("openai", "ghost", None, None)
    start(flow)
    with pytest.raises(UnknownKey, match="ghost"):
        flow.send(["UNKNOWN"])


def test_renew_asks_admin_for_the_ttl(core: PoolCore) -> None:
    flow = core._renew_flow(picked(), 5.0)
    op = start(flow)
    assert isinstance(op, ops.Run) and isinstance(op.call, protocol.Admin)
    assert op.call == protocol.Admin(op.call.call_id, "a", "renew", "lease-1", 5000)
    assert finish(flow, ["OK", 1]) is True


# ---------------------------------------------------------------------- admin


def admin_call(op: ops.Op, key_id: str, action: str, arg: str = "") -> protocol.Admin:
    assert isinstance(op, ops.Run) and op.provider == "openai"
    assert isinstance(op.call, protocol.Admin)
    assert op.call == protocol.Admin(op.call.call_id, key_id, action, arg)
    return op.call


def test_remove_forgets_the_key_and_emptied_models(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._remove_flow("openai", "a")
    admin_call(start(flow), "a", "remove")
    assert flow.send(["OK", 1, ["gpt-4o"]]) == ops.CmdMany(
        [("srem", (model_providers_key(NS, "gpt-4o"), "openai"))]
    )
    assert finish(flow, [1]) is None
    assert core._state.held("openai", "a") is None


def test_remove_unknown_raises(core: PoolCore) -> None:
    flow = core._remove_flow("openai", "a")
    start(flow)
    with pytest.raises(UnknownKey):
        flow.send(["UNKNOWN"])


def test_assign_and_unassign(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._assign_flow("gpt-4o", "openai", "a", True)
    admin_call(start(flow), "a", "assign", "gpt-4o")
    assert flow.send(["OK", 1]) == ops.Cmd("sadd", (model_providers_key(NS, "gpt-4o"), "openai"))
    finish(flow, 1)
    assert core._state.holding_model("gpt-4o") == {"openai"}

    flow = core._assign_flow("gpt-4o", "openai", "a", False)
    admin_call(start(flow), "a", "unassign", "gpt-4o")
    assert flow.send(["OK", 1, ["gpt-4o"]]) == ops.CmdMany(
        [("srem", (model_providers_key(NS, "gpt-4o"), "openai"))]
    )
    finish(flow, [1])
    assert core._state.holding_model("gpt-4o") == set()


def test_disable_enable_reset(core: PoolCore) -> None:
    flow = core._disable_flow("openai", "a", f"leaked {SECRET_A}")
    op = start(flow)
    assert isinstance(op, ops.Run) and isinstance(op.call, protocol.Admin)
    assert op.call.action == "disable" and SECRET_A not in op.call.arg  # redacted
    finish(flow, ["OK", 1])
    for action, flow in (
        ("enable", core._enable_flow("openai", "a")),
        ("reset", core._reset_flow("openai", "a")),
    ):
        admin_call(start(flow), "a", action)
        finish(flow, ["OK", 0])
    with pytest.raises(ValueError, match="reason"):
        start(core._disable_flow("openai", "a", "x" * 201))


def test_admin_on_unknown_key_held_here_recovers_and_repeats(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    core._state.set_epoch("openai", "e1")
    flow = core._enable_flow("openai", "a")
    first = admin_call(start(flow), "a", "enable")
    assert flow.send(["UNKNOWN"]) == ops.Cmd("hget", (f"{NS}:{{openai}}:meta", "epoch"))
    register_call(flow.send(None), "a", SECRET_A, budgets_spent=True)
    flow.send(["e2", "created"])
    again = admin_call(flow.send([1]), "a", "enable")
    assert again == first  # the same call, its id too
    finish(flow, ["OK", 1])


# ---------------------------------------------------------------------- read


def stats_reply(*key_ids: str) -> list[Any]:
    reply: list[Any] = [1_700_000_000_000]
    for key_id in key_ids:
        reply += [key_id, ["id", key_id, "en", "1", "total", "3"], [0, "", -1, -1, -1, 0], []]
    return reply


def test_stats(core: PoolCore) -> None:
    flow = core._stats_flow("openai", "a")
    assert start(flow) == ops.Run("openai", protocol.Stats(("a",)))
    found = finish(flow, stats_reply("a"))
    assert (found.key_id, found.total_requests) == ("a", 3)


def test_stats_of_a_missing_key_raises(core: PoolCore) -> None:
    flow = core._stats_flow("openai", "a")
    start(flow)
    with pytest.raises(UnknownKey):
        flow.send(stats_reply())


def test_snapshot_of_every_provider_recovers_missing_held_keys(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._snapshot_flow(None)
    assert start(flow) == ops.Cmd("smembers", (providers_key(NS),))
    assert flow.send({"anthropic"}) == ops.Run("anthropic", protocol.Stats())
    assert flow.send(stats_reply("x")) == ops.Run("openai", protocol.Stats())
    assert flow.send(stats_reply()) == ops.Cmd("hget", (f"{NS}:{{openai}}:meta", "epoch"))
    register_call(flow.send("new"), "a", SECRET_A, budgets_spent=True)
    flow.send(["new", "created"])
    assert flow.send([1]) == ops.Run("openai", protocol.Stats())
    found = finish(flow, stats_reply("a"))
    assert [(s.provider, s.key_id) for s in found] == [("anthropic", "x"), ("openai", "a")]


def test_providers_and_server_time(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._providers_flow()
    start(flow)
    assert finish(flow, {"cohere"}) == ["cohere", "openai"]
    flow = core._server_time_flow()
    assert start(flow) == ops.Cmd("time", ())
    assert finish(flow, (1_700_000_000, 250_000)) == 1_700_000_000.25


# ---------------------------------------------------------------------- limits


def test_set_limits_sends_the_scope_and_remembers_it_merged(core: PoolCore) -> None:
    flow = core._set_limits_flow("openai", None, "org", "gpt-4o", {"rpm": 10, "tpm": 0})
    want = protocol.SetLimits(
        "account_model", "org", "gpt-4o", (10, 0, None, None, None, None, None)
    )
    assert start(flow) == ops.Run("openai", want)
    finish(flow, ["OK"])
    assert core._state.limits_set("openai") == [want]

    flow = core._set_limits_flow("openai", None, "org", "gpt-4o", {"rpd": 5})
    sent = protocol.SetLimits("account_model", "org", "gpt-4o", (None, None, 5) + (None,) * 4)
    assert start(flow) == ops.Run("openai", sent)
    finish(flow, ["OK"])
    merged = protocol.SetLimits("account_model", "org", "gpt-4o", (10, 0, 5) + (None,) * 4)
    assert core._state.limits_set("openai") == [merged]


def test_set_limits_of_an_unknown_key_raises(core: PoolCore) -> None:
    flow = core._set_limits_flow("openai", "ghost", None, None, {"rpm": 1})
    assert start(flow) == ops.Run(
        "openai", protocol.SetLimits("key", "ghost", "", (1,) + (None,) * 6)
    )
    with pytest.raises(UnknownKey, match="ghost"):
        flow.send(["UNKNOWN"])
    assert core._state.limits_set("openai") == []


def test_set_limits_checks_its_arguments(core: PoolCore) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        start(core._set_limits_flow("openai", "a", "org", None, {"rpm": 1}))
    with pytest.raises(ValueError, match="at least one"):
        start(core._set_limits_flow("openai", "a", None, None, {}))


def test_scopes(core: PoolCore) -> None:
    flow = core._scopes_flow("openai")
    assert start(flow) == ops.Run("openai", protocol.ShowLimits())
    reply = [1000, "a:org", ["rpm", "10", "inflight", "2"], [0, "", 9, -1, -1, -1, -1, -1]]
    (scope,) = finish(flow, reply)
    assert (scope.scope, scope.account, scope.limits, scope.left, scope.in_flight) == (
        "account",
        "org",
        {"rpm": 10},
        {"rpm": 9},
        2,
    )


# ---------------------------------------------------------------------- call


def test_call_moves_to_another_key_after_a_failure(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    core._state.hold("openai", "b", held(SECRET_B))

    def fn(lease: Any) -> str:
        return "never run here"

    flow = core._call_flow(fn, "openai", None, [], 3, None, None, 0)
    acquire_call(start(flow))
    invoke = flow.send(granted("a", SECRET_A))
    assert isinstance(invoke, ops.Invoke)
    assert invoke.fn is fn and (invoke.picked.key_id, invoke.picked.secret) == ("a", SECRET_A)
    error = RuntimeError("HTTP 429")
    acquire_call(flow.send((False, (error, classify(429)))), avoid="a")
    invoke = flow.send(granted("b", SECRET_B))
    assert isinstance(invoke, ops.Invoke) and invoke.picked.key_id == "b"
    assert finish(flow, (True, "answer")) == "answer"


def test_call_raises_a_bad_request_at_once(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._call_flow(lambda lease: None, "openai", None, ["anthropic"], 3, None, None, 0)
    start(flow)
    flow.send(granted("a", SECRET_A))
    error = ValueError("bad")
    with pytest.raises(ValueError, match="bad"):
        flow.send((False, (error, classify(400))))


def test_call_falls_back_then_raises_the_earliest_no_key(core: PoolCore) -> None:
    flow = core._call_flow(
        {"openai": print}, "openai", None, [("anthropic", "claude")], 2, None, None, 0
    )
    acquire_call(start(flow))
    op = flow.send(["NONE", 3000, "cooldown"])
    assert isinstance(op, ops.Run) and op.provider == "anthropic"
    assert isinstance(op.call, protocol.Acquire) and op.call.model == "claude"
    with pytest.raises(NoKeyAvailable) as exc:
        flow.send(["NONE", 1000, "rpm"])
    assert exc.value.retry_after == 1.0


def test_call_with_no_function_for_the_pick_releases_the_lease(core: PoolCore) -> None:
    core._state.hold("openai", "a", held(SECRET_A))
    flow = core._call_flow({"anthropic": print}, "openai", None, [], 1, None, None, 0)
    call = acquire_call(start(flow))
    release = flow.send(granted("a", SECRET_A))
    report_call(release, confirm=False, call_id=call.call_id, tokens=None, outcome="release")
    with pytest.raises(ValueError, match="no function"):
        flow.send(None)


def test_models_json_is_sorted(core: PoolCore) -> None:
    flow = core._register_flow([("openai", "a", held(SECRET_A, models={"b", "a"}))])
    op = start(flow)
    assert isinstance(op, ops.Run) and isinstance(op.call, protocol.Register)
    assert json.loads(op.call.models_json) == ["a", "b"]
