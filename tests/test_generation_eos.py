"""Where a generation ends: one set of end tokens for the CLI, the control socket and the API."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from agent.route.generation import end_token_ids


def test_config_and_generation_config_eos_ids_are_merged(tmp_path: Path) -> None:
    # Llama 3 Instruct style: config.json names <|end_of_text|>, generation_config.json
    # adds <|eom_id|> and <|eot_id|>, which end a chat turn.
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [128001, 128008, 128009]})
    )
    config = SimpleNamespace(eos_token_id=128001)
    assert end_token_ids(tmp_path, config) == {128001, 128008, 128009}


def test_missing_or_broken_generation_config_falls_back_to_the_config(tmp_path: Path) -> None:
    assert end_token_ids(tmp_path, SimpleNamespace(eos_token_id=[2, 3])) == {2, 3}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert end_token_ids(tmp_path, SimpleNamespace(eos_token_id=2)) == {2}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [True, "x", 7]}))
    assert end_token_ids(tmp_path, SimpleNamespace(eos_token_id=None)) == {7}
