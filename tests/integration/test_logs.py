"""Structured logs: JSON lines with the node id (and the token for leader work), and no
secret ever reaches the output."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from app.obs.logs import Redactor, configure_logging
from app.ops.client import http_json
from app.stack.etcd import EtcdCluster
from tests.cluster import TEST_API_KEY, cluster_env, running_replicas

PAN_FORMS = ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111"]


@pytest.mark.parametrize("pan", PAN_FORMS)
def test_card_numbers_are_masked(pan: str) -> None:
    assert pan not in Redactor([]).redact(f"description was 'card {pan} exp 12/29'")


def test_keys_and_bearer_tokens_are_masked() -> None:
    redact = Redactor(["key-one", "key-one-longer"]).redact
    text = redact("keys key-one-longer key-one; header Authorization: Bearer abc.def-ghi")
    assert "key-one" not in text
    assert "abc.def-ghi" not in text
    assert "[REDACTED]" in text


def test_ordinary_numbers_survive() -> None:
    text = Redactor([]).redact("payment 123456 attempt 3 token 42 amount 1250")
    assert text == "payment 123456 attempt 3 token 42 amount 1250"


def test_configured_logging_emits_json_with_node_id_and_masks_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", node_id="n-1", secrets=["top-secret-key"], json_output=True)
        logging.getLogger("app.test").warning(
            "client sent %s with card %s", "Bearer top-secret-key", "4111 1111 1111 1111"
        )
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["node_id"] == "n-1"
    assert line["level"] == "warning"
    assert "top-secret-key" not in line["event"]
    assert "4111" not in line["event"]


@pytest.mark.chaos
def test_a_replica_logs_json_lines_with_node_and_token_and_no_keys(
    database_url: str, etcd: EtcdCluster, tmp_path: Path
) -> None:
    env = cluster_env(database_url, etcd.endpoints_csv)
    with running_replicas(1, env, tmp_path) as replicas:
        leader = replicas.wait_leader()
        node = replicas.all[0]
        # A wrong key and a right one: neither may show up in the log.
        http_json(f"{node.url}/v1/leader", api_key="wrong-key-that-must-not-leak")
        http_json(f"{node.url}/v1/leader", api_key=TEST_API_KEY)
        log_path = node.log_path
    text = log_path.read_text()
    assert TEST_API_KEY not in text
    assert "wrong-key-that-must-not-leak" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines
    assert all(line.get("node_id") == "node-0" for line in lines)
    elected = [line for line in lines if "elected leader" in line["event"]]
    assert elected
    assert str(leader["token"]) in elected[0]["event"]
    # Lines of the leader's work carry the token as a field (bound for the whole term).
    dispatcher_lines = [line for line in lines if line["logger"] == "app.dispatch.dispatcher"]
    assert dispatcher_lines, "the resigning leader logs what it leaves behind"
    assert all(line["token"] == leader["token"] for line in dispatcher_lines)
