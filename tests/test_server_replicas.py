"""Two gateway replicas (``keypool serve`` processes) on one Redis, driven at once by the
official ``openai`` Python SDK and by the official ``openai`` npm package from Node,
through a local stub upstream: one pool, exactly (budgets, per-model cooldowns, account
limits)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.test_server_support import NODE_DIR, node_path, wait_for

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from keypool import KeyPool  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.stub_llm_server import StubLLMServer, openai_429  # noqa: E402

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TOKEN = "kp-replica-token-0123456789"
RPM = 15  # per key; two keys
KEYS = {"a": "sk-alpha-000", "b": "sk-bravo-000"}
ROUTER_KEYS = {"c": "sk-charlie-00", "d": "sk-delta-0000"}
ACCOUNT_KEYS = {"e": "sk-echo-00000", "f": "sk-foxtrot-000"}  # huggingface, one account
ACCOUNT = "acct-1"
ACCOUNT_RPM = 6  # the account's, for both its keys together


class Replica:
    """One ``keypool serve`` process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keypool", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, "the replica exited"
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, interval=0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def status(self, provider: str) -> dict[str, Any]:
        doc = httpx.get(
            self.url + "/status.json", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        found: dict[str, Any] = doc["providers"][provider]
        return found

    def keys(self, provider: str) -> dict[str, dict[str, Any]]:
        return {k["key_id"]: k for k in self.status(provider)["keys"]}

    def scopes(self, provider: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.status(provider)["scopes"]
        return found

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text


@pytest.fixture
def fleet(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Any]:
    known = {v: k for keys in (KEYS, ROUTER_KEYS, ACCOUNT_KEYS) for k, v in keys.items()}
    with StubLLMServer(known) as stub:
        pool = KeyPool(redis_url, namespace=namespace)
        for key_id, secret in KEYS.items():
            pool.add_key("openai", key_id, secret, rpm=RPM)
        for key_id, secret in ACCOUNT_KEYS.items():  # the replicas keep the account
            pool.add_key("huggingface", key_id, secret, account=ACCOUNT)
        pool.set_limits("huggingface", account=ACCOUNT, rpm=ACCOUNT_RPM)
        pool.close()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KEYPOOL_")},
            "KEYPOOL_REDIS_URL": redis_url,
            "KEYPOOL_NAMESPACE": namespace,
            "KEYPOOL_PROXY_TOKENS": TOKEN,
            "KEYPOOL_UPSTREAM_OPENAI": stub.base_url,
            "KEYPOOL_UPSTREAM_OPENROUTER": stub.base_url,
            "KEYPOOL_UPSTREAM_HUGGINGFACE": stub.base_url,
            **{f"OPENAI_{k.upper()}_KEY": v for k, v in KEYS.items()},
            **{f"OPENROUTER_{k.upper()}_KEY": v for k, v in ROUTER_KEYS.items()},
            **{f"HUGGINGFACE_{k.upper()}_KEY": v for k, v in ACCOUNT_KEYS.items()},
        }
        replicas = [Replica(env, tmp_path / f"replica{i}.log") for i in range(2)]
        try:
            for replica in replicas:
                replica.wait_ready()
            yield stub, replicas
        finally:
            for replica in replicas:
                replica.stop()


def run_node(plan: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [node_path(), os.path.join(NODE_DIR, "drive.mjs"), json.dumps(plan)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def node_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def python_call(base: str, *, stream: bool = False, model: str = "gpt-4o-mini") -> dict[str, Any]:
    client = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hello from python"}]
    try:
        if stream:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,
                stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
            usage = None
            for chunk in raw.parse():
                usage = chunk.usage or usage
            return {
                "status": raw.http_response.status_code,
                "keyId": raw.headers.get("x-keypool-key-id"),
                "totalTokens": usage.total_tokens if usage else None,
            }
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)  # type: ignore[arg-type]
        reply = raw.parse()
        return {
            "status": raw.http_response.status_code,
            "keyId": raw.headers.get("x-keypool-key-id"),
            "totalTokens": reply.usage.total_tokens if reply.usage else None,
        }
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        return {
            "status": exc.status_code,
            "retryAfter": exc.response.headers.get("retry-after"),
            "code": body.get("code"),
        }


def test_two_replicas_share_one_pool_for_python_and_node(fleet: Any) -> None:
    stub, (one, two) = fleet
    bases = [one.url + "/openai/v1", two.url + "/openai/v1"]
    assert one.keys("openai")["a"]["rpm_left"] == RPM

    # 1. budgets are exact across both replicas and both languages at once
    started = time.monotonic()
    node = run_node(
        {
            "token": TOKEN,
            "model": "gpt-4o-mini",
            "badToken": bases[1],
            "requests": [{"base": bases[i % 2]} for i in range(40)],
        }
    )
    with ThreadPoolExecutor(8) as workers:
        python = list(workers.map(lambda i: python_call(bases[i % 2]), range(40)))
    from_node = node_result(node)
    elapsed = time.monotonic() - started
    answers = python + from_node["results"]
    ok = [a for a in answers if a["status"] == 200]
    refused = [a for a in answers if a["status"] == 429]
    assert len(ok) + len(refused) == 80, [a for a in answers if a["status"] not in (200, 429)]
    bound = 2 * RPM + math.ceil(2 * RPM * elapsed / 60)
    assert 2 * RPM <= len(ok) <= bound, (len(ok), bound, elapsed)
    assert len(stub.key_ids("openai")) == len(ok)  # each admitted request went upstream once
    assert all(a["code"] == "no_key_available" and int(a["retryAfter"]) >= 1 for a in refused)
    keys = two.keys("openai")
    assert keys["a"]["total_requests"] + keys["b"]["total_requests"] == len(ok)
    assert abs(keys["a"]["total_requests"] - keys["b"]["total_requests"]) <= bound - 2 * RPM + 1
    assert from_node["badTokenStatus"] == 401  # and the bad token never went upstream
    assert len(stub.key_ids("openai")) == len(ok)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=bases[0], api_key="wrong", max_retries=0).models.list()

    # 2. a 429 seen through one replica cools (key, model) for the other: the same model
    # avoids the key, another model may use it
    router = [one.url + "/openrouter/v1", two.url + "/openrouter/v1"]
    stub.plan(ROUTER_KEYS["c"], openai_429(reset_requests=None, retry_after=60))
    stub.clear()
    firsts = [python_call(router[0]) for _ in range(2)]  # one of them meets c's 429
    assert [a["status"] for a in firsts] == [200, 200]  # c's was retried on d
    assert stub.key_ids() == ["c", "d", "d"] or stub.key_ids() == ["d", "c", "d"]
    cooled = two.keys("openrouter")
    assert cooled["c"]["status"] == "active" and cooled["c"]["unavailable_reason"] is None
    assert set(cooled["c"]["cooling_models"]) == {"gpt-4o-mini"}
    assert cooled["c"]["cooling_models_left"]["gpt-4o-mini"] > 50
    assert cooled["d"]["cooling_models"] == {}
    (scope,) = [c for c in two.scopes("openrouter") if c["scope"] == "key_model"]
    assert (scope["key_id"], scope["model"], scope["state"]) == ("c", "gpt-4o-mini", "cooling")
    assert scope["unavailable_reason"] == "rate_limit" and scope["cooldown_left"] > 50
    assert (
        'keypool_scope_state{account="",key_id="c",model="gpt-4o-mini",provider="openrouter",'
        'scope="key_model",state="cooling"} 1.0' in one.metrics()
    )
    stub.clear()
    node = run_node(
        {
            "token": TOKEN,
            "model": "gpt-4o-mini",
            "badToken": None,
            "requests": [{"base": router[1], "stream": i % 2 == 0} for i in range(6)],
        }
    )
    with ThreadPoolExecutor(4) as workers:
        python = list(
            workers.map(lambda i: python_call(router[i % 2], stream=i % 2 == 1), range(6))
        )
    from_node = node_result(node)
    answers = python + from_node["results"]
    assert [a["status"] for a in answers] == [200] * 12
    assert {a["keyId"] for a in answers} == {"d"}
    assert set(stub.key_ids()) == {"d"}

    # 3. streamed and plain usage counted, whichever replica and language served it
    assert all(a["totalTokens"] for a in answers)
    served = sum(a["totalTokens"] for a in answers)
    wait_for(lambda: two.keys("openrouter")["d"]["in_flight"] == 0)
    d = one.keys("openrouter")["d"]
    assert d["success_count"] == 14  # the first two requests' too
    earlier = sum(a["totalTokens"] for a in firsts)
    wait_for(lambda: one.keys("openrouter")["d"]["tokens_used"] == served + earlier)

    # 4. nothing reaches an unconfigured host through either replica
    for replica in (one, two):
        for path in ("/custom/v1/x", "/nowhere/v1/chat/completions", "/openai/../x"):
            r = httpx.get(replica.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code in (400, 404)
    assert set(stub.key_ids()) == {"d"}

    # 5. c serves another model, through either replica, while it cools for gpt-4o-mini
    stub.clear()
    other = [python_call(router[i % 2], model="gpt-4o") for i in range(2)]
    assert [a["status"] for a in other] == [200, 200]
    assert sorted(a["keyId"] for a in other) == ["c", "d"]
    assert sorted(stub.key_ids()) == ["c", "d"]
    assert python_call(router[1])["keyId"] == "d"  # and gpt-4o-mini still avoids it
    assert set(one.keys("openrouter")["c"]["cooling_models"]) == {"gpt-4o-mini"}


def test_an_account_limit_binds_across_both_replicas(fleet: Any) -> None:
    stub, (one, two) = fleet
    bases = [one.url + "/huggingface/v1", two.url + "/huggingface/v1"]
    (account,) = [c for c in two.scopes("huggingface") if c["scope"] == "account"]
    assert account["account"] == ACCOUNT and account["limits"] == {"rpm": ACCOUNT_RPM}
    assert account["left"] == {"rpm": ACCOUNT_RPM} and account["state"] == "active"
    keys = one.keys("huggingface")
    assert {k["account"] for k in keys.values()} == {ACCOUNT}
    assert all(k["rpm"] is None for k in keys.values())  # no limit of their own

    started = time.monotonic()
    node = run_node(
        {
            "token": TOKEN,
            "model": "gpt-4o-mini",
            "badToken": None,
            "requests": [{"base": bases[i % 2]} for i in range(10)],
        }
    )
    with ThreadPoolExecutor(4) as workers:
        python = list(workers.map(lambda i: python_call(bases[i % 2]), range(10)))
    answers = python + node_result(node)["results"]
    elapsed = time.monotonic() - started
    ok = [a for a in answers if a["status"] == 200]
    refused = [a for a in answers if a["status"] == 429]
    assert len(ok) + len(refused) == 20, [a for a in answers if a["status"] not in (200, 429)]
    bound = ACCOUNT_RPM + math.ceil(ACCOUNT_RPM * elapsed / 60)
    assert ACCOUNT_RPM <= len(ok) <= bound, (len(ok), bound, elapsed)
    assert len(stub.key_ids()) == len(ok)  # each admitted request went upstream once
    assert {a["keyId"] for a in ok} == {"e", "f"}  # both keys served, within one budget
    assert all(a["code"] == "no_key_available" and int(a["retryAfter"]) >= 1 for a in refused)

    # both replicas show the account's budget spent, on /status.json and /metrics
    for replica in (one, two):
        (account,) = [c for c in replica.scopes("huggingface") if c["scope"] == "account"]
        left = account["left"]["rpm"]
        refilled = math.ceil(ACCOUNT_RPM * (time.monotonic() - started) / 60)
        assert len(ok) + left <= ACCOUNT_RPM + refilled, (len(ok), left, refilled)
        # spent: held back for rpm until a request's worth comes back (one each 10 s)
        state = "cooling" if left == 0 else "active"
        assert account["state"] == state, account
        if left == 0:
            assert account["unavailable_reason"] == "rpm" and account["cooldown_left"] > 0
        keys = replica.keys("huggingface")
        assert keys["e"]["total_requests"] + keys["f"]["total_requests"] == len(ok)
        text = replica.metrics()
        labels = f'account="{ACCOUNT}",budget="rpm",key_id="",model="",provider="huggingface"'
        assert f'keypool_scope_budget_limit{{{labels},scope="account"}} {ACCOUNT_RPM}.0' in text
        shown = re.search(
            re.escape(f'keypool_scope_budget_left{{{labels},scope="account"}} ') + r"([0-9.]+)",
            text,
        )
        assert shown and left <= float(shown.group(1)) <= left + 1  # read a moment later
        assert (
            f'keypool_scope_state{{account="{ACCOUNT}",key_id="",model="",'
            f'provider="huggingface",scope="account",state="{state}"}} 1.0' in text
        ) or float(shown.group(1)) > left
