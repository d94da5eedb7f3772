"""Publishing for real over HTTP to a local Hub stand-in (tests/fake_hub.py) with
huggingface_hub's own client: what arrives is byte-identical, failures are clear sentences that
leave the local folder untouched, and damaged folders are refused before anything is sent."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from converter.cli import main as cli_main
from converter.errors import ConversionError
from converter.hub import push_folder, validate_folder
from converter.hub.card.snippets import LOCAL_MODEL_REF
from transmla_testing.fake_hub import FakeHub, Repo, folder_digest, tiny_checkpoint

REPO_ID = "user/tiny-mla"
# huggingface_hub's LFS PUT passes a file as data=, which its HTTP client deprecates; not ours
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, calib_file) -> Path:
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), calib_file)[1]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub at HF_ENDPOINT, with no token anywhere unless a test sets one.

    Xet is switched off: with hf_xet installed huggingface_hub 2.x uploads every LFS-bound file
    through Xet storage (a binary CAS protocol) without asking the server, so the stand-in
    covers the regular + LFS path the client uses without hf_xet.
    """
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        with FakeHub() as server:
            monkeypatch.setenv("HF_ENDPOINT", server.url)
            yield server
    finally:
        if not bars_were_off:
            enable_progress_bars()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_converted_folder_passes_validation(converted):
    assert validate_folder(converted) == []


def test_upload_arrives_byte_identical(converted, hub, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    caplog.set_level(logging.DEBUG)  # every logger, huggingface_hub's HTTP client included
    before = folder_digest(converted)
    assert cli_main(["upload", str(converted), "--repo-id", REPO_ID, "--private"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"{hub.url}/{REPO_ID}"
    assert "uploaded to" in caplog.text
    assert hub.token not in out.out + out.err + caplog.text

    assert hub.repos[REPO_ID].private
    remote = hub.files(REPO_ID)
    local = {p.name: p.read_bytes() for p in converted.iterdir() if p.is_file()}
    assert set(remote) == set(local)
    for name, data in local.items():
        if name != "README.md":
            assert sha256(remote[name]) == sha256(data), name
    # shards went through the LFS batch + PUT path, the text files as regular commit content
    shards = [n for n in local if n.endswith(".safetensors")]
    assert len(shards) > 1 and {sha256(local[n]) for n in shards} <= set(hub.lfs)
    assert hub.routes_called().count("lfs_put") == len(shards)
    assert len(hub.repos[REPO_ID].commits) == 1
    # the Hub card names the repo in its usage snippets; the local card keeps the placeholder
    remote_card = remote["README.md"].decode()
    assert remote_card == local["README.md"].decode().replace(LOCAL_MODEL_REF, REPO_ID)
    assert f"vllm serve {REPO_ID} --trust-remote-code" in remote_card
    assert ModelCard(remote_card).data.base_model == "acme/tiny-qwen"
    assert set(hub.auth_headers) == {f"Bearer {hub.token}"}
    assert folder_digest(converted) == before


def test_branch_upload_and_rerun_skips_stored_files(converted, hub):
    push_folder(converted, REPO_ID, token=hub.token)
    puts = hub.routes_called().count("lfs_put")
    url = push_folder(converted, REPO_ID, token=hub.token, revision="mla-v1")
    assert url == f"{hub.url}/{REPO_ID}"
    assert hub.files(REPO_ID, "mla-v1") == hub.files(REPO_ID, "main")
    assert hub.routes_called().count("lfs_put") == puts  # LFS objects already stored
    assert not hub.repos[REPO_ID].private  # --private not asked: namespace default (public)


def test_no_token_fails_before_sending_anything(converted, hub, capsys):
    assert cli_main(["upload", str(converted), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token found" in err and "HF_TOKEN" in err
    assert "Traceback" not in err and hub.requests == []


def test_existing_repo_needs_exist_ok(converted, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    hub.repos[REPO_ID] = Repo(private=False)
    assert cli_main(["upload", str(converted), "--repo-id", REPO_ID, "--no-exist-ok"]) == 2
    err = capsys.readouterr().err
    assert f"{REPO_ID} already exists" in err and "--exist-ok" in err
    assert hub.routes_called() == ["create"] and hub.files(REPO_ID) == {}


def test_wrong_token_is_named_without_echoing_it(converted, hub):
    with pytest.raises(ConversionError) as info:
        push_folder(converted, REPO_ID, token="hf_wrong_secret")
    assert "HTTP 401" in str(info.value) and "rejected the token" in str(info.value)
    assert "hf_wrong_secret" not in str(info.value)


def test_bad_repo_id_or_unreachable_endpoint(converted, hub, monkeypatch):
    with pytest.raises(ConversionError, match="OWNER/NAME"):
        push_folder(converted, "no-namespace", token=hub.token)
    assert hub.requests == []
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConversionError) as info:
        push_folder(converted, REPO_ID, token=hub.token)
    assert "failed while creating the repository" in str(info.value)
    assert f"could not talk to http://127.0.0.1:{port}" in str(info.value)


@pytest.mark.parametrize("route,status", [("commit", 500), ("lfs_put", 507)])
def test_server_error_mid_upload_leaves_everything_as_it_was(converted, hub, route, status):
    hub.fail[route] = status
    before = folder_digest(converted)
    with pytest.raises(ConversionError) as info:
        push_folder(converted, REPO_ID, token=hub.token)
    message = str(info.value)
    assert "failed while uploading the files" in message and f"HTTP {status}" in message
    assert "local folder is unchanged" in message and hub.token not in message
    assert folder_digest(converted) == before
    assert hub.files(REPO_ID) == {} and hub.repos[REPO_ID].commits == []  # nothing half-done


def damaged_copy(converted: Path, dst: Path) -> Path:
    shutil.copytree(converted, dst)
    return dst


def test_damaged_folder_is_refused_with_every_problem(
    converted, hub, tmp_path, monkeypatch, capsys
):
    folder = damaged_copy(converted, tmp_path / "damaged")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (folder / lost).unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["kv_lora_rank"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_transmla.py").unlink()
    (folder / "README.md").write_text("---\nbase_model: /home/me/src\n---\n# card\n")
    problems = validate_folder(folder)
    expected = [
        f"names {lost}",
        "which is missing",
        "config.json lacks kv_lora_rank",
        "modeling_transmla.py is missing",
        "'/home/me/src' is not a Hub model id",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == 4

    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert cli_main(["upload", str(folder), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload" in err and "4 problem(s)" in err
    assert all(fragment in err for fragment in expected)
    assert hub.requests == []


@pytest.mark.parametrize(
    "damage,fragment",
    [
        ("unindexed", "not covered by model.safetensors.index.json"),
        ("bias_flag", "tensor(s) the config does not imply"),
        ("rope_dim", "disagree with config.json"),
        ("tokenizer", "the tokenizer does not load"),
        ("tied", "tensor(s) the config does not imply"),
    ],
)
def test_each_kind_of_damage_is_named(converted, tmp_path, damage, fragment):
    folder = damaged_copy(converted, tmp_path / "damaged")
    config_path, index_path = folder / "config.json", folder / "model.safetensors.index.json"
    config, index = json.loads(config_path.read_text()), json.loads(index_path.read_text())
    if damage == "unindexed":
        del index["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    elif damage == "bias_flag":  # config says no q bias, the weights have one
        config["transmla"]["q_bias"] = False
    elif damage == "rope_dim":
        config["qk_rope_head_dim"] = 16
    elif damage == "tokenizer":
        (folder / "tokenizer.json").write_text("{not json")
    elif damage == "tied":  # tied embeddings: the stored lm_head has no place
        config["tie_word_embeddings"] = True
    config_path.write_text(json.dumps(config))
    index_path.write_text(json.dumps(index))
    problems = validate_folder(folder)
    assert len(problems) == 1 and fragment in problems[0], problems


def _convert_args(src: Path, dst: Path, calib: Path) -> list[str]:
    return [
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--calib-text",
        str(calib),
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "16",
    ]


def test_convert_with_push_to_hub(hub, monkeypatch, tmp_path, calib_file):
    from transmla_testing.models import make_model

    monkeypatch.setenv("HF_TOKEN", hub.token)
    src = make_model(tmp_path / "src", "llama", seed=4)
    out = tmp_path / "out"
    assert cli_main(_convert_args(src, out, calib_file) + ["--push-to-hub", "user/pushed"]) == 0
    remote = hub.files("user/pushed")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_transmla.py"):
        assert sha256(remote[name]) == sha256((out / name).read_bytes())


def test_push_to_hub_without_token_fails_before_converting(hub, tmp_path, calib_file, capsys):
    from transmla_testing.models import make_model

    src = make_model(tmp_path / "src", "llama", seed=4)
    out = tmp_path / "out"
    assert cli_main(_convert_args(src, out, calib_file) + ["--push-to-hub", "user/x"]) == 2
    assert "token" in capsys.readouterr().err.lower()
    assert not out.exists() and hub.requests == []


def test_upload_base_model_names_the_source_in_the_hub_card(converted, hub, monkeypatch):
    """upload --base-model puts the source's Hub id in the uploaded card (the local folder is
    only read); a malformed id is refused before anything is sent."""
    monkeypatch.setenv("HF_TOKEN", hub.token)
    before = folder_digest(converted)
    with pytest.raises(ConversionError, match="is not a Hub model id"):
        push_folder(converted, REPO_ID, base_model="not an id")
    assert hub.routes_called() == []
    assert (
        cli_main(
            ["upload", str(converted), "--repo-id", REPO_ID, "--base-model", "acme/tiny-qwen-base"]
        )
        == 0
    )
    card = ModelCard(hub.files(REPO_ID)["README.md"].decode())
    assert card.data.base_model == "acme/tiny-qwen-base"
    assert card.data.base_model_relation == "quantized"
    assert "[acme/tiny-qwen-base](https://huggingface.co/acme/tiny-qwen-base)" in card.text
    assert f"vllm serve {REPO_ID} --trust-remote-code" in card.text
    assert folder_digest(converted) == before
