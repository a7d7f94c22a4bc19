"""Hub ids (`org/name[@revision]`) resolved through huggingface_hub's cache, without network.

The cache is built by the test in the library's real layout (blobs named by content hash, snapshot files
as relative symlinks into blobs, refs/<branch|tag> holding the commit) and huggingface_hub's own
`scan_cache_dir` must read it back before anything else runs. Offline is HF_HUB_OFFLINE=1; unreachable
is HF_ENDPOINT pointing at a closed local port. No request leaves the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vila_edge.errors import CheckpointError
from vila_edge.hub import NEEDED_FILES, parse_hub_id, resolve_checkpoint, snapshot_repo_name

pytest.importorskip("huggingface_hub")

REPO = "Efficient-Large-Model/NVILA-Lite-2B"  # a known id: its table overrides apply
COMMIT_OLD = "a" * 40
COMMIT_NEW = "b" * 40
ROOT = Path(__file__).resolve().parents[1]


def cache_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str, refs=("main",)) -> Path:
    """Add one commit of `repo` to a huggingface_hub cache folder; return its snapshot folder."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    for rel, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)  # no newline, as the library writes it
    return snap


def repo_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tiny_checkpoint):
    """HF_HOME with REPO at two commits (main -> new, tag v1 -> old) plus files vila-edge must not need."""
    home = tmp_path_factory.mktemp("hf_home")
    files = repo_files(tiny_checkpoint("nvila-lite"))
    cache_repo(home / "hub", REPO, {**files, "trainer_state.json": b"{}"}, COMMIT_OLD, refs=("v1",))
    cache_repo(home / "hub", REPO, files, COMMIT_NEW, refs=("main",))
    return home


def test_the_cache_is_in_the_library_layout(hub_home):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub_home / "hub")
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    revs = {r.commit_hash: r for r in repo.revisions}
    assert set(revs) == {COMMIT_OLD, COMMIT_NEW}
    assert revs[COMMIT_NEW].refs == frozenset({"main"}) and revs[COMMIT_OLD].refs == frozenset({"v1"})
    assert any(f.file_name == "model.safetensors" for f in revs[COMMIT_NEW].files)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE for in-process calls (the library reads the variable once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hit_and_revision_pins_from_the_cache(hub_home, offline):
    cache = hub_home / "hub"
    main = resolve_checkpoint(REPO, cache_dir=cache)
    assert main.path.name == COMMIT_NEW and main.hub.repo == REPO and main.name == "NVILA-Lite-2B"
    assert main.known is not None and main.overrides() == {"token_order": "row", "splice": "head", "chat_format": "auto"}
    assert main.overrides(splice="v15")["splice"] == "v15"  # the user's flag wins over the table
    assert resolve_checkpoint(f"{REPO}@v1", cache_dir=cache).path.name == COMMIT_OLD  # a tag
    assert resolve_checkpoint(f"{REPO}@{COMMIT_OLD}", cache_dir=cache).path.name == COMMIT_OLD  # a commit
    assert (resolve_checkpoint(f"{REPO}@v1", cache_dir=cache).path / "trainer_state.json").exists()


@pytest.mark.parametrize("arg", [f"{REPO}@v2", f"{REPO}@{'c' * 40}", "Efficient-Large-Model/NVILA-8B"])
def test_miss_is_one_line_saying_how_to_download_elsewhere(hub_home, offline, arg):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(arg, cache_dir=hub_home / "hub")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(arg) and "HF_HUB_OFFLINE is set" in msg
    assert "hf download" in msg and "pass that folder" in msg
    if "@v2" in arg:
        assert "--revision v2" in msg


def test_an_id_the_hub_would_refuse_is_one_line(hub_home, offline):
    with pytest.raises(CheckpointError, match=r"^org/name-: no local folder of that name, and not a valid hub id"):
        resolve_checkpoint("org/name-", cache_dir=hub_home / "hub")


def test_a_loaded_snapshot_is_named_after_the_repository(hub_home, offline):
    from vila_edge.checkpoint import load_checkpoint

    src = resolve_checkpoint(REPO, cache_dir=hub_home / "hub")
    ckpt = load_checkpoint(src.path, **src.overrides())
    assert ckpt.name == "NVILA-Lite-2B" and ckpt.config.family == "nvila-lite"
    assert snapshot_repo_name(src.path) == "NVILA-Lite-2B" and snapshot_repo_name(hub_home) is None


def _cli(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vila_edge.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_cli_info_with_a_hub_id(hub_home, tmp_path, how):
    """HF_HOME picks the cache; offline and unreachable both fall back to it; a miss is one line, exit 2."""
    env = {"HF_HOME": str(hub_home)}
    env.update({"HF_HUB_OFFLINE": "1"} if how == "offline" else {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    r = _cli(["info", REPO, "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"snapshots/{COMMIT_NEW}" in r.stdout and '"family": "nvila-lite"' in r.stdout
    miss = _cli(["info", "Efficient-Large-Model/NVILA-15B@v9"], env, tmp_path)
    lines = miss.stderr.strip().splitlines()
    assert miss.returncode == 2 and len(lines) == 1 and not miss.stdout, miss.stderr
    assert "hf download Efficient-Large-Model/NVILA-15B --revision v9" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if how == "offline" else "cannot be reached") in lines[0]


def test_a_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "engines" / "x").mkdir(parents=True)
    r = resolve_checkpoint("engines/x")
    assert r.hub is None and r.path == Path("engines/x")
    # not a folder and not an id: handed to the loader, which names the missing folder
    assert resolve_checkpoint("./nowhere/x").hub is None


@pytest.mark.parametrize("text, repo, rev", [
    ("Efficient-Large-Model/NVILA-8B", "Efficient-Large-Model/NVILA-8B", None),
    ("org/name@main", "org/name", "main"),
    ("org/name@refs/pr/1", "org/name", "refs/pr/1"),
    ("org/Name.v2_x@" + "a" * 40, "org/Name.v2_x", "a" * 40),
])
def test_parse_hub_id(text, repo, rev):
    h = parse_hub_id(text)
    assert h is not None and (h.repo, h.revision) == (repo, rev)


@pytest.mark.parametrize("text", ["nvila-8b", "/abs/path", "./rel/path", "a/b/c", "org/../x", "org/name@", "-x/y"])
def test_not_a_hub_id(text):
    assert parse_hub_id(text) is None


@pytest.mark.parametrize("family, layout", [("vila1.5", "dev"), ("nvila-lite", "hf")])
def test_only_the_needed_files_are_fetched_and_they_suffice(tiny_checkpoint, tmp_path, family, layout):
    """The download filter (the library's own matcher over NEEDED_FILES) keeps what the loader reads and
    drops the rest of a released repo's listing."""
    from huggingface_hub.utils import filter_repo_objects

    from vila_edge.checkpoint import load_checkpoint

    src = tiny_checkpoint(family, layout)
    files = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
    extra = ["trainer_state.json", "README.md", "llm/pytorch_model.bin", "modeling_vila.py", "assets/demo.png",
             "vision_tower/training_args.bin"]
    kept = set(filter_repo_objects(files + extra, allow_patterns=list(NEEDED_FILES)))
    assert kept == set(files)
    awq = "llm/vila-1.5-3b-w4-g128-awq-v2.pt"
    assert set(filter_repo_objects([awq, "llm/optimizer.pt"], allow_patterns=list(NEEDED_FILES))) == {awq}
    copy = tmp_path / "copy"
    for rel in kept:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, copy / rel)
    assert load_checkpoint(copy).config.family == family


def test_a_vila15_snapshot_gets_its_chat_format_from_the_repository_name(tiny_checkpoint, tmp_path, offline):
    """A config whose _name_or_path is a training path says nothing; the snapshot folder is a commit hash.
    The repository's name is what upstream's name table needs (VILA1.5-3b -> vicuna_v1)."""
    import json

    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.testing import QWEN2_CHAT_TEMPLATE

    files = repo_files(tiny_checkpoint("vila1.5"))
    top = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**top, "_name_or_path": "/checkpoints/stage3"}).encode()
    # with a chat template and no name to go by, the loader would choose "auto"
    tok_cfg = json.loads(files["llm/tokenizer_config.json"])
    files["llm/tokenizer_config.json"] = json.dumps({**tok_cfg, "chat_template": QWEN2_CHAT_TEMPLATE}).encode()
    for repo in ("Efficient-Large-Model/VILA1.5-3b", "someone/my-VILA1.5-3b-finetune"):
        cache_repo(tmp_path, repo, files, COMMIT_NEW)
        src = resolve_checkpoint(repo, cache_dir=tmp_path)
        assert (src.known is not None) == repo.startswith("Efficient")
        for kw in (src.overrides(), {}):
            cfg = load_checkpoint(src.path, **kw).config
            assert (cfg.llm.chat_format, cfg.projector.token_order, cfg.splice) == ("vicuna_v1", "col", "v15")


def test_cli_build_names_the_engines_after_the_repository(hub_home, tmp_path):
    r = _cli(["build", REPO, "--dry-run"], {"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "-> engines/NVILA-Lite-2B" in " ".join(r.stdout.split())
