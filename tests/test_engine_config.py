"""resolve_model: what a run's manifest records as the model must identify it from any working directory."""

from __future__ import annotations

import pytest

from detaudit.engine.config import resolve_model
from detaudit.errors import UsageError


def test_relative_model_dir_is_recorded_absolute(tmp_path, monkeypatch) -> None:
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == (tmp_path / "m").resolve()
    assert resolve_model("./m/").is_absolute()


@pytest.mark.parametrize("model", ["", "  "])
def test_empty_model_is_a_usage_error(model: str) -> None:
    with pytest.raises(UsageError, match="--model is empty"):
        resolve_model(model)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_batch": 0}, "--max-batch must be at least 1, got 0"),
        ({"max_model_len": 1}, "--max-model-len must be at least 2, got 1"),
    ],
)
def test_each_engine_limit_is_named_alone(tiny_model_dir, kw, message) -> None:
    """One message named both limits whichever was wrong (reached from `serve`, which has no --max-tokens)."""
    from detaudit.engine.llm import Engine, EngineConfig

    with pytest.raises(UsageError) as e:
        Engine(EngineConfig(str(tiny_model_dir), **kw))
    assert str(e.value) == message
