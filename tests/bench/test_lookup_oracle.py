from bench.lookup_oracle import oracle_tokens_per_step


def test_oracle_follows_copied_runs_within_depth_and_match():
    prompt = [9, 1, 2, 3, 4, 5, 9]
    copy = [1, 2, 3, 4, 5]
    assert oracle_tokens_per_step(prompt, copy, match_len=1, depth=8) == (5, 1)  # one step: 4 matched + bonus
    assert oracle_tokens_per_step(prompt, copy, match_len=1, depth=2) == (5, 2)  # 2 + 1, then 1 + 1 (end)
    # The occurrence of 1 follows 8, not the last token 3: a 1-token match finds it only once 1 is committed
    # (then "2 3" follows the match of 1); an unanchored oracle takes the whole run at once.
    assert oracle_tokens_per_step([8, 1, 2, 3], [1, 2, 3], match_len=1, depth=8) == (3, 2)
    assert oracle_tokens_per_step([8, 1, 2, 3], [1, 2, 3], match_len=0, depth=8) == (3, 1)
    assert oracle_tokens_per_step([1], [7, 7], match_len=0, depth=8) == (2, 2)  # nothing to copy: 1 per step
