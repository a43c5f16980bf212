"""The wire shape of parked messages: the dead-letter stream, its subjects and headers.

A stream message whose handler kept failing (or that can never be delivered: its subject lacks
the object token, it is too large) is *parked*: republished, body unchanged, on
``dlq.<deployment>.<subscription>`` in the deployment's ``DURABLE_DLQ_<deployment>`` stream, with
the original headers and the ``Durable-*`` headers below saying where it came from and why. The
worker parks; ``durable parked`` lists and replays (republishes to the original subject).
"""

from __future__ import annotations

from dataclasses import dataclass

SUBSCRIPTION_HEADER = "Durable-Subscription"
ORIGINAL_SUBJECT_HEADER = "Durable-Original-Subject"
ORIGINAL_STREAM_HEADER = "Durable-Original-Stream"
ORIGINAL_SEQUENCE_HEADER = "Durable-Original-Sequence"
ORIGINAL_MSG_ID_HEADER = "Durable-Original-Msg-Id"
REASON_HEADER = "Durable-Reason"
ATTEMPTS_HEADER = "Durable-Attempts"
PARKED_AT_HEADER = "Durable-Parked-At"
#: set on a replayed message: the stream sequence of the message it repeats
REPLAY_OF_HEADER = "Durable-Replay-Of"
MSG_ID_HEADER = "Nats-Msg-Id"
#: a header value is one line; reasons longer than this are cut
MAX_REASON = 1000


@dataclass(frozen=True)
class DeadLetters:
    """The dead-letter names of one deployment."""

    deployment_key: int

    @property
    def stream(self) -> str:
        return f"DURABLE_DLQ_{self.deployment_key}"

    @property
    def subjects(self) -> str:
        return f"dlq.{self.deployment_key}.>"

    def subject(self, subscription: str) -> str:
        return f"dlq.{self.deployment_key}.{subscription}"


def one_line(text: str) -> str:
    """A header value: NATS headers are single lines, and trimmed."""
    return " ".join(text.split())[:MAX_REASON] or "-"


def original_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The headers a replay republishes: the message's own, without ours and without a message id
    (JetStream would drop the replay as a duplicate of the original)."""
    return {k: v for k, v in (headers or {}).items()
            if not k.startswith("Durable-") and k.lower() != MSG_ID_HEADER.lower()}
