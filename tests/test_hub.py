"""Hub access: a refused or unreachable download is one message saying what to do."""

import builtins

import huggingface_hub.constants
import pytest
import requests
from click.testing import CliRunner
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled

from ideogram4_mlx import hub
from ideogram4_mlx.cli import main

try:  # the HTTP library of the installed huggingface_hub (httpx2 in 2.x, httpx in 1.x)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")


def wrapped(cause: Exception) -> LocalEntryNotFoundError:
    """What snapshot_download raises when the listing fails and nothing is cached."""
    error = LocalEntryNotFoundError(
        f"Got: {type(cause).__name__}: {cause}\nAn error happened while trying to locate the "
        "files on the Hub [...] Please check your internet connection and try again."
    )
    error.__cause__ = cause
    return error


REPO = hub.DEFAULT_REPO
NETWORK_FAILURES = {
    "wrapped ConnectError": wrapped(httpx.ConnectError("[Errno -3] name resolution failed")),
    "wrapped offline mode": wrapped(OfflineModeIsEnabled("offline mode is enabled")),
    "ConnectError": httpx.ConnectError("[Errno 111] Connection refused"),
    "ReadTimeout": httpx.ReadTimeout("timed out"),
    "ConnectionError": builtins.ConnectionError("connection reset"),
    "requests ConnectionError": requests.ConnectionError("Max retries exceeded"),
}


def fail_with(error):
    def snapshot_download(*args, **kwargs):
        raise error

    return snapshot_download


@pytest.mark.parametrize("error", NETWORK_FAILURES.values(), ids=NETWORK_FAILURES)
def test_unreachable_hub_says_gated_token_and_local_folder(monkeypatch, error):
    monkeypatch.setattr(hub, "snapshot_download", fail_with(error))
    with pytest.raises(hub.ModelAccessError) as info:
        hub.resolve_model(hub.DEFAULT_REPO)
    message = str(info.value)
    assert message.startswith(f"could not reach the Hugging Face Hub to download {REPO}")
    assert f"{REPO} is gated: request access on https://huggingface.co/{REPO}" in message
    assert "`hf auth login` or set HF_TOKEN" in message
    assert "--model LOCAL_FOLDER" in message
    cause = error.__cause__ or error
    assert f"({type(cause).__name__}: {str(cause).splitlines()[0]})" in message
    assert "\n" not in message


def test_other_repo_is_not_called_gated(monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", fail_with(httpx.ConnectError("refused")))
    with pytest.raises(hub.ModelAccessError, match="if me/mine is gated or private: request"):
        hub.download("me/mine")


def test_real_snapshot_download_in_offline_mode(monkeypatch, tmp_path):
    # huggingface_hub's own offline path: no connection is attempted at all.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(hub.ModelAccessError, match=r"\(OfflineModeIsEnabled: .*HF_HUB_OFFLINE"):
        hub.download(hub.DEFAULT_REPO)


def test_other_errors_pass_through(monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", fail_with(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left") as info:
        hub.download(hub.DEFAULT_REPO)
    assert not isinstance(info.value, hub.ModelAccessError)


def test_convert_from_an_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    error = wrapped(httpx.ConnectError("[Errno -3] name resolution failed"))
    monkeypatch.setattr(hub, "snapshot_download", fail_with(error))
    result = CliRunner().invoke(main, ["convert", hub.DEFAULT_REPO, str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "could not reach the Hugging Face Hub" in result.output
    assert "--model LOCAL_FOLDER" in result.output


def refused(repo_id: str) -> GatedRepoError:
    """What snapshot_download raises for a gated repo without access (or without a token)."""
    url = f"https://huggingface.co/api/models/{repo_id}/revision/main"
    response = httpx.Response(403, request=httpx.Request("GET", url))
    return GatedRepoError(
        f"403 Client Error. Cannot access gated repo for url {url}.", response=response
    )


def assert_suggests_local_folders_and_synth(message: str):
    """The three ways on: a folder for generate, a folder for convert, a synthetic checkpoint;
    the suggested synth command is one the CLI accepts as written."""
    assert "ideo4-mlx generate --model LOCAL_FOLDER" in message
    assert "ideo4-mlx convert LOCAL_FOLDER DST" in message
    synth = "ideo4-mlx synth /tmp/ideo4-tiny --preset tiny"
    assert synth in message
    main.commands["synth"].make_context("synth", synth.split()[2:])  # parses as written


def test_convert_without_access_suggests_a_local_folder_and_synth(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "snapshot_download", fail_with(refused(REPO)))
    result = CliRunner().invoke(main, ["convert", REPO, str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith(f"Error: access to {REPO} was refused"), line
    assert f"Request access on https://huggingface.co/{REPO}" in line
    assert_suggests_local_folders_and_synth(line)
    assert not (tmp_path / "out").exists()


def test_offline_message_suggests_a_local_folder_and_synth(monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", fail_with(httpx.ConnectError("refused")))
    with pytest.raises(hub.ModelAccessError) as info:
        hub.download(REPO)
    assert_suggests_local_folders_and_synth(str(info.value))


def test_lora_repo_ids_resolve_to_one_file(monkeypatch, tmp_path):
    """``owner/name`` takes the repo's only .safetensors file; ``owner/name/file`` that file;
    several files, or none, is an error listing them; a local file is used as it is."""
    repo = tmp_path / "snapshot"
    (repo / "sub").mkdir(parents=True)
    (repo / "style.safetensors").write_bytes(b"x")
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(repo)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    assert hub.resolve_file("owner/lora") == repo / "style.safetensors"
    assert calls[-1] == ("owner/lora", ["*.safetensors"])
    (repo / "sub" / "other.safetensors").write_bytes(b"y")
    with pytest.raises(FileNotFoundError, match=r"found 2 \(owner/lora/style.safetensors, "):
        hub.resolve_file("owner/lora")
    assert hub.resolve_file("owner/lora/sub/other.safetensors") == repo / "sub/other.safetensors"
    assert calls[-1] == ("owner/lora", ["sub/other.safetensors"])
    with pytest.raises(FileNotFoundError, match="found 0"):
        hub.resolve_file("owner/lora/missing.safetensors")
    local = tmp_path / "local.safetensors"
    local.write_bytes(b"z")
    assert hub.resolve_file(local) == local.resolve()
    with pytest.raises(FileNotFoundError, match="does not exist, and is not a Hugging Face"):
        hub.resolve_file(tmp_path / "nope.safetensors")
    monkeypatch.setattr(hub, "snapshot_download", fail_with(httpx.ConnectError("refused")))
    with pytest.raises(hub.ModelAccessError, match="could not reach the Hugging Face Hub"):
        hub.resolve_file("owner/lora")
