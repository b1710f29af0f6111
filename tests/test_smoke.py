from collections import Counter

from keypool import KeyPool, Provider


def test_round_robin_in_one_process(pool: KeyPool) -> None:
    for i in range(5):
        pool.add_key(Provider.OPENAI, f"k{i}", f"secret-value-{i}")
    counts = Counter()
    for _ in range(23):
        with pool.acquire(Provider.OPENAI) as lease:
            counts[lease.key_id] += 1
    assert sorted(counts.values()) == [4, 4, 5, 5, 5]
