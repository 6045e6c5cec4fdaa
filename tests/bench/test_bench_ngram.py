import pytest

from bench.ngram import self_repeat_share


def test_self_repeat_share():
    assert self_repeat_share(list(range(40))) == 0.0
    loop = [1, 2, 3, 4, 5] * 6  # 27 4-grams, the first 5 new
    assert self_repeat_share(loop) == pytest.approx(22 / 27)
    assert self_repeat_share([1, 2]) == 0.0  # shorter than one 4-gram
