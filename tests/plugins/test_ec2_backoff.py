"""The EC2 backend's waits: pauses that grow to 15 s and stop before the timeout, and deletes
retried while AWS says the resource is in use (moto never says so: real botocore errors here)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from plugins.backends.ec2.backoff import Backoff, delete_when_free, wait_until


def aws_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "DeleteThing")


class Deleter:
    """Answers each call with the next of ``answers`` (an error code, or None: deleted)."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        answer = self.answers.pop(0)
        if answer is not None:
            raise aws_error(answer)


def test_pauses_grow_by_the_factor_up_to_15_seconds() -> None:
    pauses: list[float] = []
    backoff = Backoff(3600, first=1.0, factor=2.0, sleep=pauses.append)
    for _ in range(7):
        assert not backoff.spent
        backoff.pause()
    assert pauses == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert Backoff(1.0, first=2.0).spent  # a pause that would end past the timeout is not taken


def test_wait_until_polls_until_done_or_the_time_is_spent() -> None:
    pauses: list[float] = []
    answers = iter([False, False, True])
    assert wait_until(lambda: next(answers), Backoff(60, sleep=pauses.append))
    assert pauses == [2.0, 3.0]
    polls: list[float] = []
    # (no time passes here) pauses of 2 and 3 s fit in 4 s, the next, 4.5, would not: three
    # polls, then False
    assert not wait_until(lambda: polls.append(1) or False, Backoff(4, sleep=polls.append))
    assert polls == [1, 2.0, 1, 3.0, 1]


def test_a_delete_is_retried_while_in_use_and_gone_counts_as_deleted() -> None:
    pauses: list[float] = []
    delete = Deleter("InUse", "InUse", None)
    assert delete_when_free(delete, gone="Gone", in_use="InUse",
                            backoff=Backoff(60, sleep=pauses.append))
    assert delete.calls == 3 and pauses == [2.0, 3.0]

    assert delete_when_free(Deleter("Gone"), gone="Gone", in_use="InUse", backoff=Backoff(60))


def test_a_delete_still_in_use_at_the_timeout_is_false_and_other_errors_are_raised() -> None:
    pauses: list[float] = []
    delete = Deleter("InUse", "InUse")
    assert not delete_when_free(delete, gone="Gone", in_use="InUse",
                                backoff=Backoff(0, sleep=pauses.append))
    assert delete.calls == 1 and pauses == []

    with pytest.raises(ClientError, match="AccessDenied"):
        delete_when_free(Deleter("AccessDenied"), gone="Gone", in_use="InUse", backoff=Backoff(60))
