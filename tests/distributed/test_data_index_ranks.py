"""The JSONL training-data index under torch.distributed (2 gloo processes): one rank builds, the
other maps what it wrote.

- one node (LOCAL_RANK 0 and 1): rank 0 builds the index, rank 1 only maps it ("reused" in its
  log, nothing parsed), both read the same records;
- a bad record: rank 0's build stops at it, and rank 1, which never parsed the file, raises the
  same file:line message (neither waits for the other);
- two "nodes" (LOCAL_RANK 0 on both): sharing the cache folder, rank 0 builds and rank 1 reuses
  it; with a folder per node (node-local disks), each builds its own.

Run alone: pytest tests/distributed/test_data_index_ranks.py (about 10 s on 2 cores)
"""

import json
import logging
import os

import pytest

from megatron_nvembed.testing import run_distributed

ROWS = [
    {"query": f"q{i}", "pos": [f"p{i}"], "neg": ["n"] * (i % 3), "task": "SQuAD"} for i in range(8)
]


def _ranks_work(rank: int, world_size: int, folder: str) -> None:
    from pathlib import Path

    from megatron_nvembed.data import jsonl_index
    from megatron_nvembed.data.loading import load_dataset_spec

    folder = Path(folder)
    logger = logging.getLogger(jsonl_index.__name__)
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)

    def opened(spec, **kwargs):
        lines.clear()
        try:
            src = load_dataset_spec(str(spec), **kwargs)
            return {"records": [r.to_json() for r in src], "log": list(lines)}
        except ValueError as err:
            return {"error": str(err), "log": list(lines)}

    out = {"one_node": opened(folder / "a.jsonl"), "bad": opened(folder / "bad.jsonl")}
    os.environ["LOCAL_RANK"] = "0"  # from here on, each rank is a node of its own
    out["shared"] = opened(folder / "a.jsonl", data_cache_path=folder / "shared")
    out["node_local"] = opened(folder / "a.jsonl", data_cache_path=folder / f"node{rank}")
    (folder / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.distributed
def test_one_rank_builds_the_other_maps_it(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad = [json.dumps(ROWS[0]), json.dumps(dict(ROWS[1], pos="p")), json.dumps(ROWS[2])]
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
    run_distributed(_ranks_work, 2, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    index = tmp_path / "a.jsonl.nvembed-index"
    assert r0["one_node"]["log"][0] == f"data index {index}: building (none yet)"
    assert r1["one_node"]["log"] == [
        f"data index {index}: reused (8 records of {tmp_path / 'a.jsonl'})"
    ]
    assert r0["one_node"]["records"] == r1["one_node"]["records"] == ROWS

    message = f"{tmp_path / 'bad.jsonl'}:2: key 'pos' must be a list of strings, got str"
    assert r0["bad"]["error"] == r1["bad"]["error"] == message
    assert r0["bad"]["log"][0].startswith("data index") and r1["bad"]["log"] == []  # no parse

    assert r0["shared"]["log"][0].endswith("building (none yet)")
    assert r1["shared"]["log"][0].endswith(f"reused (8 records of {tmp_path / 'a.jsonl'})")
    for r in (r0, r1):  # node-local folders: each node builds its own
        assert r["node_local"]["log"][0].endswith("building (none yet)")
        assert r["node_local"]["records"] == ROWS
    assert len(list((tmp_path / "shared").iterdir())) == 1
    assert [len(list((tmp_path / f"node{r}").iterdir())) for r in (0, 1)] == [1, 1]
