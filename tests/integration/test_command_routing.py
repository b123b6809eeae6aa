"""Commands routed by a real broker process to real node processes, over tcp and ipc."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh.protocol import (
    DeadlineExceededError,
    HandlerNotFoundError,
    InternalError,
    ValidationFailedError,
)
from mesh.testing import run_node


def cfg(**kwargs: object) -> str:
    return json.dumps(kwargs)


def test_each_service_reaches_the_node_that_offers_it(broker, client_of):
    """Two nodes with different services: every call lands on the node that offers it."""
    with run_node("testnodes:node", broker, config=cfg(name="a", services=["alpha"])), run_node(
        "testnodes:node", broker, config=cfg(name="b", services=["beta"])
    ):
        c = client_of(broker)
        for _ in range(5):
            assert c.call("alpha", "whoami", {}) == {"node": "a"}
            assert c.call("beta", "whoami", {}) == {"node": "b"}


def test_load_spreads_over_two_nodes_of_one_service(broker, client_of):
    """Concurrent commands for one service are shared by both of its nodes."""
    with run_node("testnodes:node", broker, config=cfg(name="a", capacity=2)), run_node(
        "testnodes:node", broker, config=cfg(name="b", capacity=2)
    ):
        c = client_of(broker)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: c.call("alpha", "work", {"sleep": 0.05}), range(24)))
        served = {r["node"] for r in results}
        assert served == {"a", "b"}
        per_node = {n: sum(r["node"] == n for r in results) for n in served}
        assert min(per_node.values()) >= 6, per_node


def test_a_node_never_runs_more_commands_than_its_capacity(broker, client_of):
    """With 16 concurrent commands and capacity 3, the node never runs more than 3 at once."""
    with run_node("testnodes:node", broker, config=cfg(name="a", capacity=3)):
        c = client_of(broker)
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: c.call("alpha", "work", {"sleep": 0.05}), range(32)))
        assert max(r["max_concurrent"] for r in results) == 3


def test_unknown_service_and_action_are_handler_not_found(broker, client_of):
    """The broker answers `handler not found` for a service or action nobody offers."""
    with run_node("testnodes:node", broker):
        c = client_of(broker)
        with pytest.raises(HandlerNotFoundError) as e:
            c.call("nobody", "whoami", {})
        assert e.value.details["missing"] == "service"
        with pytest.raises(HandlerNotFoundError) as e:
            c.call("alpha", "nothing", {})
        assert e.value.details["missing"] == "action"


def test_a_slow_command_is_answered_deadline_exceeded(broker, client_of):
    """A handler slower than the caller's timeout yields `deadline exceeded`, not a hang."""
    with run_node("testnodes:node", broker):
        c = client_of(broker)
        with pytest.raises(DeadlineExceededError):
            c.call("alpha", "work", {"sleep": 3}, timeout=0.5, retries=0)
        with pytest.raises(DeadlineExceededError):
            c.call("alpha", "nap", {"sleep": 3}, timeout=0.5, retries=0)
        assert c.call("alpha", "whoami", {}) == {"node": "t"}


def test_a_validation_error_names_the_field(broker, client_of):
    """A payload that breaks the action's schema is refused naming the offending field."""
    with run_node("testnodes:node", broker):
        c = client_of(broker)
        with pytest.raises(ValidationFailedError) as e:
            c.call("alpha", "typed", {"count": "three"})
        assert e.value.details["field"] == "count"
        with pytest.raises(ValidationFailedError) as e:
            c.call("alpha", "typed", {"count": 1, "inner": {"flag": 3}})
        assert e.value.details["field"] == "inner.flag"
        with pytest.raises(ValidationFailedError) as e:
            c.call("alpha", "typed", {})
        assert e.value.details["field"] == "count"
        assert c.call("alpha", "typed", {"count": 21}) == 42


def test_a_handler_exception_is_internal_and_the_node_keeps_serving(broker, client_of):
    """A raising handler is answered `internal` without its message; the node serves on."""
    with run_node("testnodes:node", broker) as node:
        c = client_of(broker)
        for _ in range(3):
            with pytest.raises(InternalError) as e:
                c.call("alpha", "boom", {})
            assert "RuntimeError" in e.value.message
            assert e.value.details == {"cause": "handler", "exception": "RuntimeError"}
            assert "secret" not in e.value.message
            assert c.call("alpha", "whoami", {}) == {"node": "t"}
        assert "secret" not in node.output()


def test_many_calls_in_flight_on_one_connection(broker, client_of):
    """One client connection carries many concurrent calls, each matched to its own reply."""
    with run_node("testnodes:node", broker, config=cfg(capacity=8)):
        c = client_of(broker)
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: c.call("alpha", "typed", {"count": i}), range(200)))
        assert results == [2 * i for i in range(200)]


def test_system_service_lists_every_action_with_its_schema(broker, client_of):
    """`mesh.services` shows each registered action with description and schema; ping answers."""
    with run_node("testnodes:node", broker, config=cfg(services=["alpha", "beta"])):
        c = client_of(broker)
        reg = c.call("mesh", "services")
        assert set(reg) == {"alpha", "beta"}
        work = reg["alpha"]["actions"]["work"]
        assert work["schema"]["required"] == ["sleep"]
        assert "Sleep" in work["description"]
        assert c.call("mesh", "ping")["pong"] is True


def test_a_reply_larger_than_the_limit_is_an_error_and_frees_the_node(client_of):
    """A result past the broker's message limit is answered MESSAGE_TOO_LARGE at once; the node serves on."""
    from mesh.protocol import MessageTooLargeError
    from mesh.testing import run_broker

    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--max-message-bytes", "20000") as b:
        with run_node("testnodes:node", b, config=cfg(capacity=1)):
            c = client_of(b)
            for _ in range(3):  # capacity 1: a leaked slot would block the next call
                with pytest.raises(MessageTooLargeError) as e:
                    c.call("alpha", "blob", {"size": 50_000}, timeout=5)
                assert e.value.details["limit"] == 20000
                assert c.call("alpha", "blob", {"size": 10}, timeout=5) == "x" * 10
