"""Model resolution: local folders, the HF cache, and clear errors when neither has it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_sdk.llm.model_resolver import ModelNotAvailableError, resolve_model
from dynamo_sdk.llm.testing.tiny_model import build_tiny_model


def test_local_folder(tmp_path: Path) -> None:
    model = build_tiny_model()
    assert resolve_model(str(model)) == model.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_repo_id_from_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot laid out as huggingface_hub does is found without any network."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("acme/tiny") == snapshot
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model("acme/absent")
    assert "acme/absent" in str(info.value) and str(cache) in str(info.value)
