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


def test_anchored_oracle_resumes_copying_after_one_new_token():
    # The output is "7 2 3 4"; the last context token 1 never occurred before, so plain lookup finds nothing
    # until 7 is committed (step 1: the bonus token 7; step 2: 7 -> 2 3 4). Anchored under 7 (a model draft's
    # level-1 node), the lookup matches 7 -> 2 3 4 in the same step.
    prompt = [7, 2, 3, 4, 1]
    out = [7, 2, 3, 4]
    assert oracle_tokens_per_step(prompt, out, match_len=1, depth=8) == (4, 2)
    assert oracle_tokens_per_step(prompt, out, match_len=1, depth=8, anchored=True) == (4, 1)
