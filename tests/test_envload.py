"""Tests of keypool.envload: keys from environment variables and key files."""

from __future__ import annotations

import itertools

import pytest

from keypool.envload import (
    ALIASES,
    EnvKey,
    EnvScan,
    parse_key_file,
    scan_env,
    split_key_list,
)
from keypool.fingerprint import derived_key_id
from keypool.providers import Provider, validate_key_id

SECRET_A = "sk-secret-AAAA1111"
SECRET_B = "sk-secret-BBBB2222"
SECRET_C = "sk-secret-CCCC3333"


def triples(scan: EnvScan) -> list[tuple[str, str, str, str]]:
    return [(k.provider, k.key_id, k.secret, k.source) for k in scan.keys]


def pairs(scan: EnvScan) -> set[tuple[str, str]]:
    return {(k.provider, k.key_id) for k in scan.keys}


# --- the alias table ---------------------------------------------------------------------


def test_alias_table() -> None:
    assert dict(ALIASES) == {
        "HF": "huggingface",
        "HUGGINGFACE": "huggingface",
        "OPENAI": "openai",
        "ANTHROPIC": "anthropic",
        "COHERE": "cohere",
        "AZURE_OPENAI": "azure_openai",
        "OLLAMA": "ollama",
        "GEMINI": "gemini",
        "GOOGLE": "gemini",
        "OPENROUTER": "openrouter",
    }
    assert set(ALIASES.values()) <= {p.value for p in Provider}


def test_alias_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        ALIASES["X"] = "x"  # type: ignore[index]


# --- <PROVIDER>_API_KEY --------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "provider"), sorted(ALIASES.items()))
def test_api_key_every_alias(alias: str, provider: str) -> None:
    var = f"{alias}_API_KEY"
    scan = scan_env({var: SECRET_A})
    assert triples(scan) == [(provider, "default", SECRET_A, var)]
    assert scan.skipped == ()


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ("OPENAI_API_KEY", ("openai", "default")),
        ("GEMINI_API_KEY", ("gemini", "default")),
        ("GOOGLE_API_KEY", ("gemini", "default")),
        ("HF_API_KEY", ("huggingface", "default")),
        ("AZURE_OPENAI_API_KEY", ("azure_openai", "default")),
    ],
)
def test_api_key_examples(var: str, expected: tuple[str, str]) -> None:
    assert pairs(scan_env({var: SECRET_A})) == {expected}


def test_azure_openai_is_not_openai() -> None:
    scan = scan_env({"AZURE_OPENAI_API_KEY": SECRET_A, "OPENAI_API_KEY": SECRET_B})
    assert triples(scan) == [
        ("azure_openai", "default", SECRET_A, "AZURE_OPENAI_API_KEY"),
        ("openai", "default", SECRET_B, "OPENAI_API_KEY"),
    ]
    assert scan.skipped == ()


def test_azure_openai_named_key() -> None:
    scan = scan_env({"AZURE_OPENAI_EASTUS_KEY": SECRET_A})
    assert triples(scan) == [("azure_openai", "eastus", SECRET_A, "AZURE_OPENAI_EASTUS_KEY")]


def test_api_key_value_is_stripped() -> None:
    scan = scan_env({"OPENAI_API_KEY": f"  {SECRET_A}\n"})
    assert [k.secret for k in scan.keys] == [SECRET_A]


def test_api_key_with_a_list_inside_is_skipped() -> None:
    scan = scan_env({"OPENAI_API_KEY": f"{SECRET_A},{SECRET_B}", "HF_X_KEY": "a b"})
    assert scan.keys == ()
    assert scan.skipped == (
        "HF_X_KEY: 'value contains a comma or whitespace; list keys in HF_API_KEYS'",
        "OPENAI_API_KEY: 'value contains a comma or whitespace; list keys in OPENAI_API_KEYS'",
    )
    assert SECRET_A not in repr(scan)


# --- <PROVIDER>_API_KEYS -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f"{SECRET_A},{SECRET_B},{SECRET_C}",
        f"{SECRET_A} {SECRET_B}   {SECRET_C}",
        f"{SECRET_A}\n{SECRET_B}\n{SECRET_C}\n",
        f"{SECRET_A}\r\n{SECRET_B}\t{SECRET_C}",
        f" {SECRET_A}, {SECRET_B} ,\n {SECRET_C} ",
        f"{SECRET_A},,{SECRET_B},{SECRET_C},,",
        f",{SECRET_A},\n,{SECRET_B}, ,{SECRET_C},",
    ],
)
def test_api_keys_separators(value: str) -> None:
    scan = scan_env({"OPENAI_API_KEYS": value})
    expected = sorted(
        ("openai", derived_key_id(s), s, "OPENAI_API_KEYS") for s in (SECRET_A, SECRET_B, SECRET_C)
    )
    assert triples(scan) == expected
    assert scan.skipped == ()


def test_api_keys_ids_are_derived_and_valid() -> None:
    scan = scan_env({"HUGGINGFACE_API_KEYS": f"{SECRET_A},{SECRET_B}"})
    assert {k.key_id: k.secret for k in scan.keys} == {
        derived_key_id(SECRET_A): SECRET_A,
        derived_key_id(SECRET_B): SECRET_B,
    }
    for key in scan.keys:
        assert key.provider == "huggingface"
        assert validate_key_id(key.key_id) == key.key_id


def test_api_keys_stable_under_reordering() -> None:
    secrets = [SECRET_A, SECRET_B, SECRET_C]
    results = {
        scan_env({"GEMINI_API_KEYS": ",".join(order)}).keys
        for order in itertools.permutations(secrets)
    }
    assert len(results) == 1


def test_api_keys_duplicates_collapse() -> None:
    scan = scan_env({"COHERE_API_KEYS": f"{SECRET_A},{SECRET_B},{SECRET_A}\n{SECRET_B}"})
    assert [k.secret for k in scan.keys] == sorted([SECRET_A, SECRET_B], key=derived_key_id)
    assert scan.skipped == ()


def test_api_keys_only_separators_is_empty() -> None:
    scan = scan_env({"OPENAI_API_KEYS": " , \n ,"})
    assert scan == EnvScan(keys=(), skipped=())


# --- <ALIAS>_<NAME>_KEY --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ("HF_RESEARCH_KEY", ("huggingface", "research")),
        ("HF_PROD_KEY", ("huggingface", "prod")),
        ("HUGGINGFACE_PROD_KEY", ("huggingface", "prod")),
        ("OPENAI_TEAM_A_KEY", ("openai", "team_a")),
        ("GOOGLE_BATCH2_KEY", ("gemini", "batch2")),
        ("ANTHROPIC_X_KEY", ("anthropic", "x")),
        ("OPENROUTER_FREE_TIER_KEY", ("openrouter", "free_tier")),
        ("OLLAMA_LOCAL_KEY", ("ollama", "local")),
    ],
)
def test_named_keys(var: str, expected: tuple[str, str]) -> None:
    scan = scan_env({var: SECRET_A})
    assert triples(scan) == [(*expected, SECRET_A, var)]
    assert scan.skipped == ()


def test_api_key_is_default_not_name_api() -> None:
    scan = scan_env({"OPENAI_API_KEY": SECRET_A})
    assert pairs(scan) == {("openai", "default")}


def test_named_key_invalid_name_is_skipped() -> None:
    env = {"HF__KEY": SECRET_A, "OPENAI__X_KEY": SECRET_B, f"HF_{'A' * 65}_KEY": SECRET_C}
    scan = scan_env(env)
    assert scan.keys == ()
    assert scan.skipped == (
        f"HF_{'A' * 65}_KEY: 'name is not a valid key id'",
        "HF__KEY: 'name is not a valid key id'",
        "OPENAI__X_KEY: 'name is not a valid key id'",
    )
    for secret in (SECRET_A, SECRET_B, SECRET_C):
        assert secret not in repr(scan)


def test_all_three_forms_together() -> None:
    env = {
        "HF_API_KEY": SECRET_A,
        "HF_RESEARCH_KEY": SECRET_B,
        "HUGGINGFACE_API_KEYS": f"{SECRET_C}",
        "OPENAI_API_KEY": SECRET_A,
    }
    scan = scan_env(env)
    assert triples(scan) == sorted(
        [
            ("huggingface", "default", SECRET_A, "HF_API_KEY"),
            ("huggingface", "research", SECRET_B, "HF_RESEARCH_KEY"),
            ("huggingface", derived_key_id(SECRET_C), SECRET_C, "HUGGINGFACE_API_KEYS"),
            ("openai", "default", SECRET_A, "OPENAI_API_KEY"),
        ]
    )
    assert scan.skipped == ()


# --- empty and unrelated -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", " ", "\n\t  "])
def test_empty_values_ignored(value: str) -> None:
    env = {"OPENAI_API_KEY": value, "HF_API_KEYS": value, "HF_RESEARCH_KEY": value}
    assert scan_env(env) == EnvScan(keys=(), skipped=())


@pytest.mark.parametrize(
    "var",
    [
        "OLLAMA_API_URL",
        "OPENAI_BASE_URL",
        "HF_HOME",
        "PATH",
        "KEYPOOL_SECRET_KEY",
        "AZURE_OPENAI_ENDPOINT",
        "HF_KEY",
        "OPENAI_API_KEY_FILE",
        "MY_OPENAI_API_KEY",
        "openai_api_key",
        "AZURE_API_KEY",
    ],
)
def test_unrelated_vars_ignored(var: str) -> None:
    assert scan_env({var: SECRET_A}) == EnvScan(keys=(), skipped=())


def test_default_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        monkeypatch.delenv(name)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET_A)
    monkeypatch.setenv("PATH", "/usr/bin")
    scan = scan_env()
    assert triples(scan) == [("anthropic", "default", SECRET_A, "ANTHROPIC_API_KEY")]


# --- duplicates across variables -----------------------------------------------------------


def test_same_id_same_secret_keeps_one() -> None:
    scan = scan_env({"HF_API_KEY": SECRET_A, "HUGGINGFACE_API_KEY": SECRET_A})
    assert triples(scan) == [("huggingface", "default", SECRET_A, "HUGGINGFACE_API_KEY")]
    assert scan.skipped == ()


@pytest.mark.parametrize(
    ("short", "canonical", "provider"),
    [
        ("HF_API_KEY", "HUGGINGFACE_API_KEY", "huggingface"),
        ("GOOGLE_API_KEY", "GEMINI_API_KEY", "gemini"),
        ("HF_PROD_KEY", "HUGGINGFACE_PROD_KEY", "huggingface"),
    ],
)
def test_same_id_different_secret_canonical_wins(short: str, canonical: str, provider: str) -> None:
    for env in ({short: SECRET_A, canonical: SECRET_B}, {canonical: SECRET_B, short: SECRET_A}):
        scan = scan_env(env)
        assert [(k.provider, k.secret, k.source) for k in scan.keys] == [
            (provider, SECRET_B, canonical)
        ]
        assert scan.skipped == (f"{short}: 'duplicate of {canonical}'",)
        assert SECRET_A not in repr(scan)


def test_api_key_beats_named_default() -> None:
    scan = scan_env({"OPENAI_DEFAULT_KEY": SECRET_A, "OPENAI_API_KEY": SECRET_B})
    assert triples(scan) == [("openai", "default", SECRET_B, "OPENAI_API_KEY")]
    assert scan.skipped == ("OPENAI_DEFAULT_KEY: 'duplicate of OPENAI_API_KEY'",)


def test_same_secret_in_list_and_single_is_registered_once() -> None:
    scan = scan_env({"OPENAI_API_KEY": SECRET_A, "OPENAI_API_KEYS": f"{SECRET_A},{SECRET_B}"})
    assert triples(scan) == sorted(
        [
            ("openai", "default", SECRET_A, "OPENAI_API_KEY"),
            ("openai", derived_key_id(SECRET_B), SECRET_B, "OPENAI_API_KEYS"),
        ]
    )
    assert scan.skipped == (
        f"OPENAI_API_KEYS: \"key id '{derived_key_id(SECRET_A)}' has the same secret as "
        'OPENAI_API_KEY"',
    )


def test_same_secret_two_lists_of_one_provider() -> None:
    scan = scan_env({"HF_API_KEYS": SECRET_A, "HUGGINGFACE_API_KEYS": SECRET_A})
    assert triples(scan) == [
        ("huggingface", derived_key_id(SECRET_A), SECRET_A, "HUGGINGFACE_API_KEYS")
    ]
    assert scan.skipped == ()


def test_same_secret_different_providers_kept() -> None:
    scan = scan_env({"OPENAI_API_KEY": SECRET_A, "AZURE_OPENAI_API_KEY": SECRET_A})
    assert pairs(scan) == {("openai", "default"), ("azure_openai", "default")}


def test_deterministic_whatever_the_order() -> None:
    items = [
        ("HF_API_KEY", SECRET_A),
        ("HUGGINGFACE_API_KEY", SECRET_B),
        ("HUGGINGFACE_DEFAULT_KEY", SECRET_C),
        ("HF_API_KEYS", f"{SECRET_A} {SECRET_C}"),
        ("GOOGLE_API_KEY", SECRET_A),
        ("GEMINI_API_KEY", SECRET_B),
        ("HF__KEY", SECRET_C),
    ]
    results = {scan_env(dict(order)) for order in itertools.permutations(items)}
    assert len(results) == 1
    (scan,) = results
    assert [(k.provider, k.key_id) for k in scan.keys] == sorted(
        (k.provider, k.key_id) for k in scan.keys
    )
    assert list(scan.skipped) == sorted(scan.skipped)


# --- secrets never shown -------------------------------------------------------------------


def test_no_secret_in_repr() -> None:
    env = {
        "OPENAI_API_KEY": SECRET_A,
        "HF_API_KEYS": f"{SECRET_B},{SECRET_C}",
        "HF_API_KEY": SECRET_C,
        "HUGGINGFACE_API_KEY": SECRET_B,
    }
    scan = scan_env(env)
    assert len(scan.keys) >= 3
    text = repr(scan) + str(scan) + "".join(repr(k) + str(k) for k in scan.keys)
    for secret in (SECRET_A, SECRET_B, SECRET_C):
        assert secret not in text
    key = EnvKey("openai", "default", SECRET_A, "OPENAI_API_KEY")
    assert repr(key) == "EnvKey(provider='openai', key_id='default', source='OPENAI_API_KEY')"


def test_envkey_is_frozen() -> None:
    key = EnvKey("openai", "default", SECRET_A, "OPENAI_API_KEY")
    with pytest.raises(AttributeError):
        key.secret = SECRET_B  # type: ignore[misc]


# --- split_key_list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        (" ,\n, ", []),
        ("a", ["a"]),
        ("a,b,c", ["a", "b", "c"]),
        ("a b\tc", ["a", "b", "c"]),
        ("a\nb\r\nc\n", ["a", "b", "c"]),
        ("c, a ,\nb,", ["c", "a", "b"]),
        ("a,,b,,,", ["a", "b"]),
        ("b,a,b,a,c", ["b", "a", "c"]),
    ],
)
def test_split_key_list(value: str, expected: list[str]) -> None:
    assert split_key_list(value) == expected


# --- parse_key_file ------------------------------------------------------------------------


def test_parse_key_file() -> None:
    text = f"""
# keys for the research team

research = {SECRET_A}
  {SECRET_B}
   # indented comment
prod={SECRET_C}
b64=QUJDRA==
"""
    assert parse_key_file(text) == [
        ("research", SECRET_A),
        (None, SECRET_B),
        ("prod", SECRET_C),
        ("b64", "QUJDRA=="),
    ]


def test_parse_key_file_empty() -> None:
    assert parse_key_file("") == []
    assert parse_key_file("\n\n# only comments\n   \n") == []


def test_parse_key_file_crlf() -> None:
    assert parse_key_file(f"a={SECRET_A}\r\n{SECRET_B}\r\n") == [("a", SECRET_A), (None, SECRET_B)]


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (f"bad id={SECRET_A}", "'bad id'"),
        (f"_x={SECRET_A}", "'_x'"),
        (f"={SECRET_A}", "''"),
        (f"a/b={SECRET_A}", "'a/b'"),
    ],
)
def test_parse_key_file_invalid_key_id(line: str, shown: str) -> None:
    text = f"# header\n\nok={SECRET_B}\n{line}\n"
    with pytest.raises(ValueError) as info:
        parse_key_file(text)
    message = str(info.value)
    assert message.startswith(f"line 4: invalid key id {shown}")
    assert SECRET_A not in message
    assert SECRET_B not in message


def test_parse_key_file_long_key_id_not_shown() -> None:
    long_id = "x" * 65
    with pytest.raises(ValueError, match=r"^line 1: invalid key id of 65 characters") as info:
        parse_key_file(f"{long_id}={SECRET_A}")
    assert long_id not in str(info.value)
    assert SECRET_A not in str(info.value)


@pytest.mark.parametrize("line", ["name=", "name=  ", "QUJDRA==", "QUJD="])
def test_parse_key_file_missing_secret(line: str) -> None:
    with pytest.raises(ValueError, match=r"^line 2: no secret after '='") as info:
        parse_key_file(f"\n{line}\n")
    assert "QUJD" not in str(info.value)


@pytest.mark.parametrize(
    ("line", "where"),
    [
        (f"{SECRET_A} {SECRET_B}", ""),
        (f"{SECRET_A} # note", ""),
        (f"name={SECRET_A} {SECRET_B}", " for key id 'name'"),
    ],
)
def test_parse_key_file_whitespace_in_secret(line: str, where: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_key_file(f"# c\n{line}")
    message = str(info.value)
    assert message.startswith(f"line 2: secret{where} contains whitespace")
    assert SECRET_A not in message
    assert SECRET_B not in message


def test_key_file_values_in_quotes_lose_the_quotes() -> None:
    assert parse_key_file("team-a=\"sk-quoted-1\"\n'sk-quoted-2'\n") == [
        ("team-a", "sk-quoted-1"),
        (None, "sk-quoted-2"),
    ]
