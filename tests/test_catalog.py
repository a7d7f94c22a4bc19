"""The known-checkpoints table: the loader's heuristic agrees with it, `vila-edge models` lists every entry
with a planner verdict, and the README's table names every entry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vila_edge.catalog import GEOMETRY, KNOWN, disagreements, find_known, rows, verdict
from vila_edge.config import CHAT_FORMATS, FAMILIES
from vila_edge.plan import list_profiles, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k", KNOWN, ids=[k.name for k in KNOWN])
def test_the_loader_heuristic_agrees_with_the_table(k):
    assert k.family in FAMILIES and k.chat_format in CHAT_FORMATS and k.geometry in GEOMETRY
    assert disagreements(k) == []


def test_a_disagreement_is_reported():
    """The check can fail: a VILA1.5 config with NVILA-era keys makes the heuristic say row/head."""
    k = find_known("Efficient-Large-Model/VILA1.5-3b")
    found = disagreements(k, top_changes={"image_encoder": '{"_target_": "llava.model.encoders.BasicImageEncoder"}'})
    assert len(found) == 2 and "token_order table='col' loader='row'" in found[0] and "splice" in found[1]


def test_lookup_is_case_insensitive_and_ids_are_unique():
    assert find_known("efficient-large-model/nvila-8b").repo == "Efficient-Large-Model/NVILA-8B"
    assert find_known("someone/NVILA-8B") is None
    assert len({k.repo.lower() for k in KNOWN}) == len(KNOWN)


def test_every_entry_gets_a_planner_verdict_per_device():
    table = rows()
    profiles = list_profiles()
    assert [r["id"] for r in table] == [k.repo for k in KNOWN] and len(profiles) >= 5
    for r in table:
        assert set(r["devices"]) == set(profiles) and r["int4_gib"] > 0.5
        assert all(v["verdict"] in ("fits", "knobs", "no") and v["detail"] for v in r["devices"].values())
    # the verdict is the planner's: "fits" exactly when plan() fits; "knobs" carries its fix
    for k in KNOWN:
        for d in profiles:
            v, detail = verdict(k.geometry, d)
            p = plan(k.preset.config(), d)
            assert (v == "fits") == p.fits and (v != "knobs" or detail == " or ".join(p.fixes))
    by_id = {r["id"]: r for r in table}
    small, big = by_id["Efficient-Large-Model/NVILA-Lite-2B"], by_id["Efficient-Large-Model/NVILA-15B"]
    assert small["devices"]["orin-nano-8gb"]["verdict"] == "fits"
    assert big["devices"]["orin-nano-8gb"]["verdict"] == "no" and big["int4_gib"] > 3 * small["int4_gib"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vila_edge.cli", "models", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"}, cwd=ROOT)


def test_cli_models_lists_every_entry():
    r = _cli()
    assert r.returncode == 0, r.stderr
    for k in KNOWN:
        assert re.search(rf"\b{re.escape(k.name)}\b", r.stdout), k.name
    one = _cli("--device", "orin-nano-8gb", "--json")
    data = json.loads(one.stdout)
    assert len(data) == len(KNOWN) and all(list(e["devices"]) == ["orin-nano-8gb"] for e in data)
    bad = _cli("--device", "orin-nano-4gb")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not a known profile" in bad.stderr


def test_the_readme_table_names_every_entry():
    text = (ROOT / "README.md").read_text()
    for k in KNOWN:
        assert f"| {k.name} |" in text, f"README's known-checkpoints table lacks {k.name}"
