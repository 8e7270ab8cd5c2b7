"""The broker seam, without a server: which broker a setting names, and what each one
configures (priorities, queue arguments, transport options)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gridqueue.brokers import broker_of
from gridqueue.brokers.amqp import AmqpBroker, server_version
from gridqueue.brokers.redis import RedisBroker
from gridqueue.celeryapp import NEVER_REDELIVER_S, celery_for
from gridqueue.connection import RedisTarget
from gridqueue.settings import Settings

REDIS = "redis://127.0.0.1:1/0"
AMQP = "amqp://user:secret@rabbit.example:5672/gq"


def test_unset_the_broker_is_the_ledgers_redis() -> None:
    settings = Settings(redis_url=REDIS)
    assert isinstance(settings.broker, RedisBroker)
    app = celery_for(settings)
    assert app.conf.broker_url == REDIS
    assert app.conf.broker_transport_options["visibility_timeout"] == NEVER_REDELIVER_S
    assert app.conf.worker_disable_prefetch is True
    assert app.conf.task_queue_max_priority is None
    assert isinstance(broker_of(RedisTarget(REDIS), "  "), RedisBroker)  # empty is unset


def test_amqp_puts_the_messages_on_rabbitmq_and_the_ledger_stays_on_redis() -> None:
    settings = Settings(redis_url=REDIS, broker_url=AMQP, broker_consumer_timeout_s=7200)
    assert isinstance(settings.broker, AmqpBroker)
    assert settings.redis_target.url == REDIS
    app = celery_for(settings)
    conf = app.conf
    assert conf.broker_url == AMQP
    assert conf.broker_transport_options == {"confirm_publish": True}
    assert conf.task_acks_late and conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    # Redis-only: Celery ignores it elsewhere, with a warning in every worker.
    assert not conf.worker_disable_prefetch
    queue = app.amqp.queues["gq.model.sim-llm"]  # a per-model queue, made on demand
    assert queue.queue_arguments == {"x-max-priority": 9, "x-consumer-timeout": 7_200_000}
    assert queue.durable


def test_a_requeued_attempt_goes_first_on_either_broker() -> None:
    redis_broker = broker_of(RedisTarget(REDIS))
    amqp_broker = broker_of(RedisTarget(REDIS), AMQP)
    requeue, fresh, batch = 0, 3, 6
    # kombu's Redis transport serves the lowest number first, RabbitMQ the highest.
    assert redis_broker.message_priority(requeue) < redis_broker.message_priority(fresh)
    assert amqp_broker.message_priority(requeue) > amqp_broker.message_priority(fresh)
    assert amqp_broker.message_priority(fresh) > amqp_broker.message_priority(batch)
    assert [amqp_broker.message_priority(s) for s in (0, 9)] == [9, 0]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0", "must be an amqp:// or amqps:// URL"),
        ("rabbit.example:5672", "must be an amqp:// or amqps:// URL"),
        ("amqp:///vhost", "names no host"),
    ],
)
def test_a_broker_url_that_names_no_rabbitmq_is_refused_with_what_to_do(
    url: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=REDIS, broker_url=url)
    text = str(caught.value)
    assert message in text and "GRIDQUEUE_BROKER_URL" in text


def test_the_server_version_decides_where_the_consumer_timeout_is_set() -> None:
    assert server_version({"version": b"3.10.8"}) == (3, 10, 8)
    assert server_version({"version": "4.0.5"}) == (4, 0, 5)
    assert server_version({}) is None
