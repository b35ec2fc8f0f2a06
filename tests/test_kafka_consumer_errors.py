"""The error a dead Kafka consumer thread ends the source with (no broker needed)."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from bridge.errors import KafkaConsumerError, SourceError, describe_failure
from bridge.sources.kafka_consumer import consumer_failed


def test_a_refused_subscription_is_not_retriable_and_names_the_setting_to_correct():
    exc = consumer_failed(KafkaException(KafkaError(KafkaError._INVALID_ARG, "Failed to set subscription: bad regex")))
    assert isinstance(exc, KafkaConsumerError) and isinstance(exc, SourceError)
    assert not exc.retriable
    text = str(exc)
    assert text.startswith("the Kafka consumer thread failed: KafkaException: ")
    assert "Failed to set subscription" in text and "source.topic_pattern" in text
    assert "Nothing that was not applied was committed" in text
    line, code = describe_failure(exc)
    assert line == text and code == 1


def test_any_other_failure_is_retriable_and_says_what_to_check():
    exc = consumer_failed(KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down", fatal=True)))
    assert exc.retriable
    assert "source.bootstrap_servers" in str(exc) and "onesignal-bridge check" in str(exc)
    gone = consumer_failed(None, "ended unexpectedly")
    assert str(gone).startswith("the Kafka consumer thread ended unexpectedly; ") and gone.retriable
