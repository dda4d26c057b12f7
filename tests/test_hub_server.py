"""The Hub-compatible test server, exercised through the real ``huggingface_hub`` client."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, RepoFile, RepoFolder, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RevisionNotFoundError

from hub_server import LFS_SIZE_THRESHOLD, HubServer

TOKEN = "hf_test_token"


@pytest.fixture
def server() -> Iterator[HubServer]:
    """A token-protected server, with this process's client pointed at it."""
    with HubServer(token=TOKEN) as hub, hub.configure_client():
        yield hub


@pytest.fixture
def api(server: HubServer) -> HfApi:
    return HfApi(endpoint=server.url, token=TOKEN)


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    """A trainer-like output folder: text, a nested file, LFS files by extension and by size, a checkpoint."""
    out = tmp_path / "output"
    (out / "unet").mkdir(parents=True)
    (out / "checkpoint-500").mkdir()
    (out / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}\n')
    (out / "unet" / "config.json").write_text('{"sample_size": 8}\n')
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(4096))
    (out / "samples.txt").write_bytes(b"0123456789abcdef\n" * (LFS_SIZE_THRESHOLD // 17 + 1000))
    (out / "checkpoint-500" / "optimizer.bin").write_bytes(os.urandom(256))
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digests(root: Path) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in _tree_bytes(root).items()}


def _raw(
    server: HubServer,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request without the client, for protocol details the client does not reach."""
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def test_create_repo_whoami_and_exist_ok(api: HfApi, server: HubServer) -> None:
    assert api.whoami()["name"] == server.username
    url = api.create_repo("pipeline")
    assert url.repo_id == f"{server.username}/pipeline" and url.endpoint == server.url
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("pipeline")
    assert excinfo.value.response.status_code == 409
    assert api.create_repo("pipeline", exist_ok=True).repo_id == url.repo_id
    assert api.create_repo("pipeline", repo_type="dataset").repo_id == url.repo_id  # another repo type, another repo
    info = api.model_info(url.repo_id)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # like the Hub: an initial commit
    assert info.sha == api.list_repo_commits(url.repo_id)[0].commit_id
    assert api.repo_exists(url.repo_id) and not api.repo_exists(f"{server.username}/missing")


def test_upload_folder_is_one_commit_through_lfs_and_downloads_byte_exact(
    api: HfApi, server: HubServer, output_dir: Path, tmp_path: Path
) -> None:
    repo_id = api.create_repo("ddpm-mixture").repo_id
    before = _digests(output_dir)
    info = api.upload_folder(folder_path=output_dir, repo_id=repo_id, ignore_patterns=["checkpoint-*"])

    commits = api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == ["Upload folder using huggingface_hub", "initial commit"]
    assert info.oid == commits[0].commit_id and info.repo_url.repo_id == repo_id
    assert server.requests.count(("POST", f"/api/models/{repo_id}/commit/main")) == 1
    assert ("POST", f"/{repo_id}.git/info/lfs/objects/batch") in server.requests
    assert sum(method == "PUT" for method, _ in server.requests) == 2  # the two LFS files, nothing else

    expected = _tree_bytes(output_dir)
    del expected["checkpoint-500/optimizer.bin"]
    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *expected])
    lfs = {f.path: f.lfs for f in api.list_repo_tree(repo_id, recursive=True) if isinstance(f, RepoFile)}
    assert {path for path, info in lfs.items() if info is not None} == {
        "samples.txt",  # by size
        "unet/diffusion_pytorch_model.safetensors",  # by extension
    }
    assert lfs["samples.txt"].sha256 == hashlib.sha256(expected["samples.txt"]).hexdigest()

    snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache", endpoint=server.url))
    downloaded = _tree_bytes(snapshot)
    assert downloaded.pop(".gitattributes").startswith(b"*.")
    assert downloaded == expected
    one = hf_hub_download(repo_id, "unet/config.json", cache_dir=tmp_path / "cache2", endpoint=server.url)
    assert Path(one).read_bytes() == expected["unet/config.json"]
    assert _digests(output_dir) == before  # the upload only reads


def test_history_downloads_by_commit_sha_and_skips_unchanged_files(
    api: HfApi, server: HubServer, output_dir: Path, tmp_path: Path
) -> None:
    repo_id = api.create_repo("history").repo_id
    first = api.upload_folder(folder_path=output_dir, repo_id=repo_id, ignore_patterns=["checkpoint-*"]).oid
    unchanged = api.upload_folder(folder_path=output_dir, repo_id=repo_id, ignore_patterns=["checkpoint-*"])
    assert unchanged.oid == first  # preupload reports remote oids: nothing changed, nothing committed

    (output_dir / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "v": 2}\n')
    second = api.upload_folder(folder_path=output_dir, repo_id=repo_id, ignore_patterns=["checkpoint-*"])
    assert second.oid != first
    assert server.requests.count(("POST", f"/api/models/{repo_id}/commit/main")) == 2
    api.delete_file("samples.txt", repo_id)
    api.delete_folder("unet", repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes", "model_index.json"]
    assert len(api.list_repo_files(repo_id, revision=first)) == 5

    old = hf_hub_download(repo_id, "model_index.json", revision=first, cache_dir=tmp_path / "c", endpoint=server.url)
    new = hf_hub_download(repo_id, "model_index.json", cache_dir=tmp_path / "c", endpoint=server.url)
    assert Path(old).read_text() == '{"_class_name": "DDPMPipeline"}\n'
    assert Path(new).read_text().endswith('"v": 2}\n')
    snapshot = Path(snapshot_download(repo_id, revision=first, cache_dir=tmp_path / "c", endpoint=server.url))
    assert (snapshot / "samples.txt").stat().st_size > LFS_SIZE_THRESHOLD
    assert api.model_info(repo_id, revision=first).sha == first

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "model_index.json", revision="f" * 40, cache_dir=tmp_path / "c", endpoint=server.url)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "samples.txt", cache_dir=tmp_path / "c", endpoint=server.url)


def test_token_is_required_for_writes(server: HubServer, output_dir: Path, tmp_path: Path) -> None:
    anonymous = HfApi(endpoint=server.url, token=False)
    wrong = HfApi(endpoint=server.url, token="hf_wrong")
    for client, reason in ((anonymous, "requires a token"), (wrong, "Invalid token")):
        with pytest.raises(HfHubHTTPError, match=reason) as excinfo:
            client.create_repo("secret")
        assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        wrong.whoami()

    repo_id = HfApi(endpoint=server.url, token=TOKEN).create_repo("secret").repo_id
    with pytest.raises(HfHubHTTPError, match="Invalid token") as excinfo:
        wrong.upload_folder(folder_path=output_dir, repo_id=repo_id)
    assert excinfo.value.response.status_code == 401
    assert anonymous.list_repo_files(repo_id) == [".gitattributes"]  # reads stay open and nothing was committed
    path = hf_hub_download(repo_id, ".gitattributes", cache_dir=tmp_path / "cache", endpoint=server.url, token=False)
    assert Path(path).read_bytes().startswith(b"*.")


@pytest.mark.parametrize("failure, message", [("error", "Simulated server failure"), ("disconnect", "disconnected")])
def test_failed_commit_raises_and_leaves_everything_intact(
    api: HfApi, server: HubServer, output_dir: Path, failure: str, message: str
) -> None:
    repo_id = api.create_repo("flaky").repo_id
    before = _digests(output_dir)
    server.fail_commits = failure  # type: ignore[assignment]
    with pytest.raises(Exception, match=message):
        api.upload_folder(folder_path=output_dir, repo_id=repo_id)
    assert _digests(output_dir) == before
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    server.fail_commits = None
    api.upload_folder(folder_path=output_dir, repo_id=repo_id)  # the LFS objects are already there: just commit
    assert len(api.list_repo_files(repo_id)) == 1 + len(before)


def test_subprocess_client_from_environment(server: HubServer, output_dir: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from huggingface_hub import create_repo, snapshot_download, upload_folder

        repo_id = create_repo("from-env", exist_ok=True).repo_id
        upload_folder(folder_path=sys.argv[1], repo_id=repo_id, ignore_patterns=["checkpoint-*"])
        print(snapshot_download(repo_id))
        """
    )
    env = {**os.environ, **server.client_env(), "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(output_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    assert snapshot.is_relative_to(tmp_path / "hf_home")
    assert (
        _tree_bytes(snapshot)["unet/diffusion_pytorch_model.safetensors"]
        == (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert ("PUT" in {method for method, _ in server.requests}) and server.username in str(snapshot)


def test_configure_client_redirects_module_functions_and_restores(tmp_path: Path) -> None:
    import huggingface_hub

    saved = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET)
    with HubServer() as server:
        with server.configure_client():
            repo_id = huggingface_hub.create_repo("plain", token="anything").repo_id
            huggingface_hub.upload_file(path_or_fileobj=b"hi\n", path_in_repo="a.txt", repo_id=repo_id, token="x")
            path = huggingface_hub.hf_hub_download(repo_id, "a.txt", cache_dir=tmp_path)
            assert Path(path).read_bytes() == b"hi\n"
        assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET) == saved
        assert huggingface_hub.hf_api.api.endpoint == saved[0]
    with pytest.raises(RuntimeError, match="not running"):
        server.url


def test_dataset_repos(api: HfApi, server: HubServer, tmp_path: Path) -> None:
    repo_id = api.create_repo("mixture-samples", repo_type="dataset").repo_id
    api.upload_file(path_or_fileobj=b"\0\1\2" * 100, path_in_repo="data/x.raw", repo_id=repo_id, repo_type="dataset")
    assert ("POST", f"/datasets/{repo_id}.git/info/lfs/objects/batch") in server.requests  # NUL bytes: binary
    path = hf_hub_download(repo_id, "data/x.raw", repo_type="dataset", cache_dir=tmp_path, endpoint=server.url)
    assert Path(path).read_bytes() == b"\0\1\2" * 100
    folders = [f.path for f in api.list_repo_tree(repo_id, repo_type="dataset") if isinstance(f, RepoFolder)]
    assert folders == ["data"]
    assert [f.path for f in api.list_repo_tree(repo_id, "data", repo_type="dataset")] == ["data/x.raw"]


def test_protocol_details(api: HfApi, server: HubServer) -> None:
    repo_id = api.create_repo("raw").repo_id
    auth = {"Authorization": f"Bearer {TOKEN}"}
    data = b"payload " * 1000
    oid = hashlib.sha256(data).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}
    status, _, body = _raw(server, "POST", f"/{repo_id}.git/info/lfs/objects/batch", json.dumps(batch).encode(), auth)
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"].removeprefix(server.url)
    assert _raw(server, "PUT", href[:-4] + "0000", data)[0] == 403  # forged signature
    assert _raw(server, "PUT", href, data[:-1] + b"!")[0] == 400  # wrong hash: rejected, not stored
    assert _raw(server, "PUT", href, (data[i : i + 999] for i in range(0, len(data), 999)))[0] == 200  # chunked
    status, _, body = _raw(server, "POST", f"/{repo_id}.git/info/lfs/objects/batch", json.dumps(batch).encode(), auth)
    assert "actions" not in json.loads(body)["objects"][0]  # already stored: nothing to upload

    def commit(*ops: dict, parent: str | None = None) -> tuple[int, dict[str, str], bytes]:
        header = {"summary": "raw", "description": "", **({"parentCommit": parent} if parent else {})}
        lines = [{"key": "header", "value": header}, *ops]
        payload = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return _raw(server, "POST", f"/api/models/{repo_id}/commit/main", payload, auth)

    binary = {"key": "file", "value": {"path": "w.bin", "content": "AAEC", "encoding": "base64"}}
    assert commit(binary)[0] == 400  # binary content must go through LFS
    assert commit({"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64}})[0] == 400
    assert commit({"key": "deletedFile", "value": {"path": "nope.txt"}})[0] == 404
    assert commit({"key": "file", "value": {"path": "../x", "content": "", "encoding": "base64"}})[0] == 400
    assert commit({"key": "lfsFile", "value": {"path": "w.bin", "oid": oid}}, parent="0" * 40)[0] == 412
    status, _, body = commit({"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid}})
    assert status == 200 and json.loads(body)["commitOid"] == api.model_info(repo_id).sha

    status, headers, body = _raw(server, "HEAD", f"/{repo_id}/resolve/main/w.bin")
    assert status == 200 and body == b""
    assert headers["X-Linked-Etag"] == f'"{oid}"' and headers["X-Linked-Size"] == str(len(data))
    assert headers["Content-Length"] == str(len(data)) and headers["X-Repo-Commit"] == api.model_info(repo_id).sha
    assert _raw(server, "GET", f"/{repo_id}/resolve/main/w.bin")[2] == data
    status, headers, _ = _raw(server, "GET", f"/{repo_id}/resolve/main/missing.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert _raw(server, "GET", "/api/no/such/endpoint/here")[0] == 404
    status, _, body = _raw(server, "GET", f"/api/models/{repo_id}/xet-write-token/main", headers=auth)
    assert status == 501 and b"HF_HUB_DISABLE_XET" in body


def test_xet_enabled_client_fails_fast_with_the_xet_endpoint_named(api: HfApi) -> None:
    pytest.importorskip("hf_xet")
    repo_id = api.create_repo("xet").repo_id
    constants.HF_HUB_DISABLE_XET = False  # restored when the `server` fixture leaves configure_client()
    with pytest.raises(Exception, match="xet-write-token"):
        api.upload_file(path_or_fileobj=os.urandom(64), path_in_repo="w.safetensors", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]
