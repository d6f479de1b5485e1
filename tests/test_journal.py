"""The sent-journal of a batch (``producer.journal``): which key each job is first sent under."""

from __future__ import annotations

from pathlib import Path

from claudebox_pool.producer.journal import Journal, Sent, path_of, read, starts


def test_a_job_sent_without_a_known_outcome_is_sent_again_under_the_same_key() -> None:
    journal = [Sent(batch_id="b", job_id="a"), Sent(batch_id="b", job_id="c")]

    plan = starts("b", ["a", "c", "d"], journal, known={"c": "b/c/1"})

    assert (plan["a"].sent.key, plan["a"].unknown) == ("b/a/1", True)
    # c's outcome is known (it failed, or it would not be resumed): a new run, a new key.
    assert (plan["c"].sent.key, plan["c"].unknown) == ("b/c/2", False)
    assert (plan["d"].sent.key, plan["d"].unknown) == ("b/d/1", False)


def test_the_journal_survives_being_resumed_into_itself_and_drops_a_torn_last_line(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.jsonl"
    first = Journal(path_of(results), [])
    first.record(Sent(batch_id="b", job_id="a"))
    first.close()
    with path_of(results).open("a") as handle:
        handle.write('{"batch_id": "b", "job_')  # killed mid-write: that send never happened

    carried = read(results)
    again = Journal(path_of(results), carried)
    again.record(Sent(batch_id="b", job_id="c"))
    again.close()

    assert [sent.key for sent in read(results)] == ["b/a/1", "b/c/1"]
