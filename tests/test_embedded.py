"""The embedded default (MiniLM + Rotten Tomatoes) loads offline and analyses end to end."""

import pytest

from slora import embedded


def test_sentences_are_labelled_deduplicated_and_split_by_movie():
    data = embedded.load_sentences()
    assert len(data.text) > 10_000 and set(data.label) == {0, 1}
    assert len(set(data.text)) == len(data.text)
    majority = max(data.label.count(0), data.label.count(1)) / len(data.label)
    assert 0.5 < majority < 0.7
    train, test = embedded.split_by_movie(data)
    assert not {data.movie[i] for i in train} & {data.movie[i] for i in test}
    assert len(train) + len(test) == len(data.text)


@pytest.mark.slow
def test_cli_analyze_on_the_embedded_model(tmp_path, capsys):
    from slora.cli import main

    assert main(["analyze", "--batches", "1", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.5.output.dense" in out and "rank" in out
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert (tmp_path / "plan.json").exists()
