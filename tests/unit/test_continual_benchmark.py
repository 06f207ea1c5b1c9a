"""benchmarks/continual.py's stream: seeded, each row used once, domains arriving on time."""

from __future__ import annotations

import pandas as pd

from benchmarks.continual import OOS, batch_id, make_stream


def _train() -> pd.DataFrame:
    rows = [{"text": f"{dom} {lab} {i}", "label": f"{dom}_{lab}", "domain": dom}
            for dom in ("bank", "home", "travel") for lab in ("a", "b") for i in range(20)]
    rows += [{"text": f"oos {i}", "label": OOS, "domain": OOS} for i in range(20)]
    return pd.DataFrame(rows)


def test_the_stream_uses_each_row_once_and_brings_domains_when_it_says():
    train = _train()
    kw = dict(domains=["home", "bank", "travel"], initial=2, arrival=3, batches=4, first=6,
              routine=2, seed=0)
    stream = make_stream(train, **kw)
    both = pd.concat(stream)
    assert not both["text"].duplicated().any()
    assert [sorted(set(b["domain"])) for b in stream] == [
        ["bank", "home", OOS], ["bank", "home", OOS], ["bank", "home", OOS, "travel"],
        ["bank", "home", OOS, "travel"]]
    sizes = [b.groupby("label").size().to_dict() for b in stream]
    assert sizes[0] == {"bank_a": 6, "bank_b": 6, "home_a": 6, "home_b": 6, OOS: 6}
    assert sizes[1] == dict.fromkeys(sizes[0], 2)
    assert sizes[2]["travel_a"] == 6 and sizes[2]["bank_a"] == 2 and sizes[3]["travel_a"] == 2
    again = make_stream(train, **kw)
    assert all(a.equals(b) for a, b in zip(stream, again, strict=True))
    assert [batch_id(k, b) for k, b in enumerate(stream, 1)] == [
        batch_id(k, b) for k, b in enumerate(again, 1)]
    assert batch_id(1, stream[0]).startswith("0001-")
