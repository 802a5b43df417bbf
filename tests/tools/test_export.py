"""Hub export, push and Hub downloads.

The exported folder is loaded in a separate Python whose sys.path holds only site-packages, with no `.pth`
processing (so neither the repository nor the editable install is reachable): `import modeling_memory`
fails there, and the folder's own code must reproduce the package's logits. Uploads and downloads run
huggingface_hub for real; only the HTTP transport is replaced, by a small in-memory Hub (`FakeHub`).
"""

import base64
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import _http
from safetensors.torch import load, load_file, save_file

import modeling_memory
from memory_llama_cli import main
from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.graft_to_folder import GraftError, graft_checkpoint
from modeling_memory.tools.export import ExportError, export_for_hub
from modeling_memory.tools.model_card import read_base_info
from conftest import random_ids, tiny_config, train_steps
from test_graft import SMALL_MEMORY, assert_same_as_base, char_tokenizer, write_base

# The HTTP client library huggingface_hub uses (httpx before 2.0, its fork httpx2 since).
http_client = _http.httpx2 if hasattr(_http, "httpx2") else _http.httpx

# Exactly the run-time modules: the model, its memory modules, the ops with their kernels (imported lazily)
# and the kernel switch. Tooling (grafting, canonical ids, export, the command line, ...) never travels.
RUNTIME_FILES = {
    "modeling_memory_llama.py", "configuration_memory_llama.py", "engram.py", "chapter_memory.py",
    "product_key_memory.py", "associative_memory.py", "ops_engram.py", "ops_chapter_attention.py",
    "ops_product_keys.py", "ops_mosaic_keys.py", "ops_table_rows.py", "table_placement.py", "table_sharding.py",
    "kernel_backend.py", "kernels_engram.py", "kernels_chapter_attention.py", "kernels_product_keys.py",
    "kernels_mosaic_keys.py",
}
RUNTIME_DIR = Path(modeling_memory.memory_llama.__file__).parent


def test_runtime_subpackage_is_the_remote_code_set():
    """The run-time subpackage holds exactly the files an export ships, plus its __init__ and the naive references
    of the ops (`naive_*.py`), which only tests and benchmarks import, so an export never reaches them."""
    files = {p.name for p in RUNTIME_DIR.glob("*.py")}
    naive = {name for name in files if name.startswith("naive_")}
    assert naive and files - naive == RUNTIME_FILES | {"__init__.py"}


class FakeHub:
    """The Hub's HTTP API, as much as create_repo, create_branch, upload_folder (regular + LFS files),
    list_repo_files and snapshot_download use, kept in memory."""

    STORAGE = "https://lfs-storage.invalid"

    def __init__(self):
        self.requests = []  # (method, path, authorization header)
        self.repos = {}  # repo id -> {"private", "files": {path: bytes}, "commits": [...], "branches"}
        self.lfs_objects = {}
        self.create_requests = []

    def serve(self, repo_id, files):
        self.repos[repo_id] = {"private": False, "files": dict(files), "commits": [], "branches": {"main"}}

    def downloaded(self, repo_id, filename):
        return any(m == "GET" and p.startswith(f"/{repo_id}/resolve/") and p.endswith(f"/{filename}") for m, p, _ in self.requests)

    def sha(self, repo_id):
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def handler(self, request: http_client.Request) -> http_client.Response:
        url = urlparse(str(request.url))
        path = url.path
        self.requests.append((request.method, path, request.headers.get("authorization")))
        if str(request.url).startswith(self.STORAGE):
            oid = path.strip("/")
            assert hashlib.sha256(request.content).hexdigest() == oid
            self.lfs_objects[oid] = request.content
            return http_client.Response(200)
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.create_requests.append(body)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            private = body.get("visibility") == "private" or bool(body.get("private"))
            self.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": [], "branches": {"main"}})
            return http_client.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            content = json.loads(request.content)["content"]
            metadata = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            if not isinstance(metadata, dict):
                return http_client.Response(400, json={"errors": [{"message": "README.md has no YAML metadata"}]})
            return http_client.Response(200, json={"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
            self.repos[match[1]]["branches"].add(match[2])
            return http_client.Response(200, json={})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/.+", path):
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                      "shouldIgnore": False} for f in files]
            return http_client.Response(200, json={"files": modes})
        if re.fullmatch(r"/[^/]+/[^/]+\.git/info/lfs/objects/batch", path):
            objects = json.loads(request.content)["objects"]
            actions = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        "actions": {"upload": {"href": f"{self.STORAGE}/{o['oid']}", "header": {}}}} for o in objects]
            return http_client.Response(200, json={"transfer": "basic", "objects": actions})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            repo = self.repos[match[1]]
            lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
            commit = {"revision": match[2], "header": lines[0]["value"], "files": {}}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    commit["files"][value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    commit["files"][value["path"]] = self.lfs_objects[value["oid"]]
            repo["commits"].append(commit)
            repo["files"].update(commit["files"])
            oid = hashlib.sha1(request.content).hexdigest()
            return http_client.Response(200, json={"commitUrl": f"https://huggingface.co/{match[1]}/commit/{oid}",
                                              "commitOid": oid, "pullRequestUrl": None})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|revision)/([^/]+)(/.*)?", path)
        if match and request.method == "GET":
            if match[1] not in self.repos:
                return http_client.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"})
            files = self.repos[match[1]]["files"]
            if match[2] == "tree":
                return http_client.Response(200, json=[{"type": "file", "path": name, "size": len(data),
                                                   "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(files.items())])
            return http_client.Response(200, json={"id": match[1], "sha": self.sha(match[1]), "private": False,
                                              "siblings": [{"rfilename": name} for name in sorted(files)]})
        if (match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and match[1] in self.repos:
            data = self.repos[match[1]]["files"].get(match[3])
            if data is None:
                return http_client.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "Entry not found"})
            headers = {"X-Repo-Commit": self.sha(match[1]), "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            return http_client.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return http_client.Response(404, json={"error": f"no route for {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Online mode against FakeHub; the LFS protocol over HTTP (hf_xet would upload outside Python's HTTP)."""
    hub = FakeHub()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    _http.set_client_factory(
        lambda: http_client.Client(transport=http_client.MockTransport(hub.handler), event_hooks={"request": [_http.hf_request_event_hook]})
    )
    yield hub
    _http.set_client_factory(_http.default_client_factory)


# An associative memory beside attention at layer 1 too, so the remote code carries all its files.
MOSAIC_BESIDE = dict(mosaic_layers=[1], mosaic_placement="parallel", mosaic_short_window=8, mosaic_min_delay=2,
                     mosaic_max_delay=4)


def memory_vocab_config(**overrides) -> MemoryLlamaConfig:
    return tiny_config(vocab_size=112, **overrides)  # room for the 101-token test tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny MemoryLlama (memory outputs non-zero) saved as a checkpoint with its tokenizer."""
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(memory_vocab_config(**MOSAIC_BESIDE)))
    checkpoint = tmp_path_factory.mktemp("trained") / "tiny-memory"
    model.save_pretrained(checkpoint)
    char_tokenizer().save_pretrained(checkpoint)
    return model, checkpoint


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, checkpoint = trained
    out = tmp_path_factory.mktemp("export") / "tiny-memory-hub"
    assert main(["export", str(checkpoint), str(out), "--repo-id", "me/tiny-memory"]) == 0
    return out


def test_export_folder_contents(trained, exported):
    model, _ = trained
    files = {p.name for p in exported.iterdir()}
    assert {name for name in files if name.endswith(".py")} == RUNTIME_FILES
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= files
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
        "AutoModel": "modeling_memory_llama.MemoryLlamaModel",
        "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
    }
    for name in RUNTIME_FILES:  # the package's own files, unchanged
        assert (exported / name).read_bytes() == (RUNTIME_DIR / name).read_bytes()
    card = (exported / "README.md").read_text()
    assert "custom_code" in card and 'from_pretrained("me/tiny-memory", trust_remote_code=True' in card
    assert "{{" not in card
    # The registration lasted only for the export.
    assert not MemoryLlamaForCausalLM.is_remote_code() and MemoryLlamaConfig._auto_class is None
    assert "auto_map" not in model.config.to_dict()


# Runs in a Python that sees only site-packages (no .pth files, so no editable install, no repository).
_ISOLATED = r"""
import os, sys
sys.path.append({site!r})
try:
    import modeling_memory
except ModuleNotFoundError:
    pass
else:
    sys.exit("modeling_memory is importable: " + modeling_memory.__file__)
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

folder, ids_file, out_file = sys.argv[1:4]
ids = load_file(ids_file)["ids"]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "MemoryLlamaModel"
outputs = {{}}
with torch.no_grad():
    backend = next(m for name, m in sys.modules.items() if name.endswith(".kernel_backend"))
    os.environ["MODELING_MEMORY_KERNELS"] = "torch"
    backend.reload_settings()
    outputs["reference"] = model(input_ids=ids).logits
    outputs["generated"] = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    os.environ["MODELING_MEMORY_KERNELS"] = "triton"  # the interpreted Triton kernels, from the folder
    backend.reload_settings()
    outputs["kernels"] = model(input_ids=ids).logits
loaded = sorted(name.rsplit(".", 1)[-1] for name in sys.modules if name.startswith("transformers_modules."))
print("LOADED", " ".join(loaded))
save_file({{k: v.contiguous() for k, v in outputs.items()}}, out_file)
"""


@pytest.mark.slow
def test_export_loads_without_the_package_and_gives_identical_logits(trained, exported, tmp_path):
    model, _ = trained
    ids = random_ids(2, 12, torch.Generator().manual_seed(1))
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = _ISOLATED.format(site=sysconfig.get_paths()["purelib"])
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "TRITON_INTERPRET": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(exported), str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(next(line for line in result.stdout.splitlines() if line.startswith("LOADED")).split()[1:])
    assert {"modeling_memory_llama", "kernels_engram", "kernels_chapter_attention"} <= loaded

    remote = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        generated = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["reference"], expected)
    torch.testing.assert_close(remote["kernels"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(remote["generated"], generated)


def test_export_with_relative_paths(trained, tmp_path, monkeypatch):
    """`memory-llama export smollm2-memory smollm2-memory-hub`, as the README writes it: relative CHECKPOINT and
    OUT, though the check that loads the export without the package runs in a scratch folder of its own."""
    import shutil

    model, checkpoint = trained
    shutil.copytree(checkpoint, tmp_path / "tiny-memory")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "tiny-memory", "tiny-memory-hub"]) == 0
    assert (tmp_path / "tiny-memory-hub" / "config.json").is_file()
    assert 'from_pretrained("tiny-memory-hub", trust_remote_code=True' in (tmp_path / "tiny-memory-hub" / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-memory", "tiny-memory-hub"]  # no staging folder left


def test_export_refuses_bad_input(trained, tmp_path):
    _, checkpoint = trained
    plain = tmp_path / "plain"
    write_base(plain)
    with pytest.raises(SystemExit, match="is a 'llama' checkpoint, not memory_llama: graft memory onto it first"):
        main(["export", str(plain), str(tmp_path / "out")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        main(["export", str(checkpoint), str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["export", str(tmp_path / "full"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_export_that_fails_its_check_leaves_nothing(trained, tmp_path, monkeypatch):
    _, checkpoint = trained
    monkeypatch.setattr("modeling_memory.tools.export.logits_without_package", lambda folder, ids, dtype: torch.zeros(*ids.shape, 112))
    with pytest.raises(ExportError, match="logits differ from the model's"):
        export_for_hub(str(checkpoint), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not MemoryLlamaForCausalLM.is_remote_code()


def test_push_uploads_the_checked_export(trained, exported, fake_hub, capsys):
    _, checkpoint = trained
    assert main(["push", str(checkpoint), "me/tiny-memory", "--private", "--commit-message", "first upload"]) == 0
    assert "pushed to https://huggingface.co/me/tiny-memory/commit/" in capsys.readouterr().out
    repo = fake_hub.repos["me/tiny-memory"]
    assert repo["private"] and len(repo["commits"]) == 1
    assert repo["commits"][0]["header"]["summary"] == "first upload"
    writes = [auth for method, path, auth in fake_hub.requests if re.search(r"/repos/create|/preupload/|/commit/", path)]
    assert len(writes) == 3 and set(writes) == {"Bearer hf_test_token"}

    reference = exported  # `memory-llama export` of the same checkpoint, for the same repo id
    uploaded = repo["files"]
    assert set(uploaded) == {p.name for p in reference.iterdir()}
    for name in RUNTIME_FILES | {"config.json", "tokenizer.json", "generation_config.json"}:
        assert uploaded[name] == (reference / name).read_bytes(), name
    expected = load_file(reference / "model.safetensors")
    actual = load(uploaded["model.safetensors"])
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert b'from_pretrained("me/tiny-memory", trust_remote_code=True' in uploaded["README.md"]


def test_push_to_hub_from_python(trained, fake_hub):
    model, checkpoint = trained
    commit = modeling_memory.push_to_hub(model, "me/from-python", tokenizer=char_tokenizer(), commit_message="hello", revision="dev")
    assert commit.commit_url.startswith("https://huggingface.co/me/from-python/commit/")
    repo = fake_hub.repos["me/from-python"]
    assert "dev" in repo["branches"] and repo["commits"][0]["revision"] == "dev"
    assert {"tokenizer.json", "model.safetensors", "README.md", "config.json"} | RUNTIME_FILES <= set(repo["files"])
    assert json.loads(repo["files"]["config.json"])["auto_map"]["AutoModelForCausalLM"].endswith("MemoryLlamaForCausalLM")
    # The model itself is unchanged: a later plain save has no remote code.
    assert not MemoryLlamaForCausalLM.is_remote_code() and "auto_map" not in model.config.to_dict()


def test_push_refused_offline_or_with_a_bad_repo_id(trained, monkeypatch):
    model, checkpoint = trained
    monkeypatch.setattr("modeling_memory.tools.export.load_checkpoint_for_export", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        main(["push", str(checkpoint), "me/tiny-memory"])
    with pytest.raises(ExportError, match="Invalid Hub repository id 'not a repo'"):
        modeling_memory.push_to_hub(model, "not a repo")


def test_graft_from_a_hub_id(fake_hub, tmp_path, monkeypatch):
    base = write_base(tmp_path / "published", max_shard_size="100KB")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    files = {p.name: p.read_bytes() for p in base.iterdir()}
    fake_hub.serve("org/tiny-llama", {**files, "consolidated.safetensors": b"another copy, never fetched"})
    out = tmp_path / "from-hub"
    graft_checkpoint("org/tiny-llama", out, preset="engram", overrides=SMALL_MEMORY)
    assert_same_as_base(base, out)
    shards = [name for name in files if name.startswith("model-")]
    assert len(shards) > 1 and all(fake_hub.downloaded("org/tiny-llama", name) for name in shards)
    assert not fake_hub.downloaded("org/tiny-llama", "consolidated.safetensors")
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card and "license: apache-2.0" in card
    assert read_base_info(out) == ("org/tiny-llama", "org/tiny-llama", "apache-2.0")  # what an export carries over

    # Offline, the Hub cache serves it without a request.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    before = len(fake_hub.requests)
    graft_checkpoint("org/tiny-llama", tmp_path / "from-cache", preset="engram", overrides=SMALL_MEMORY)
    assert len(fake_hub.requests) == before
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    # Pickle-only and missing repositories fail before any weights are downloaded.
    torch.save({}, tmp_path / "pytorch_model.bin")
    small = {name: data for name, data in files.items() if name.endswith((".json", ".md"))}
    small.pop("model.safetensors.index.json")
    fake_hub.serve("org/pickled", {**small, "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})
    with pytest.raises(ToolError, match="only pickle weights .* --allow-pickle"):
        graft_checkpoint("org/pickled", tmp_path / "out")
    assert not fake_hub.downloaded("org/pickled", "pytorch_model.bin")
    with pytest.raises(GraftError, match="no such model repository on the Hub"):
        graft_checkpoint("org/missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
