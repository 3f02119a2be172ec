"""How a greedy continuation is compared with the stored one (edgeq/llm/greedy.py)."""

from edgeq.llm.greedy import match_tokens


def test_match_tokens_says_where_tokens_first_differ():
    assert match_tokens([1, 2, 3], [1, 2, 3]) == (True, "3 greedy tokens equal the reference")
    same, detail = match_tokens([1, 5, 3], [1, 2, 3])
    assert not same and detail.startswith("greedy tokens differ from position 1:")
    assert match_tokens([1, 2], [1, 2, 3])[1].startswith("greedy tokens differ from position 2:")  # EOS came early
    same, detail = match_tokens([1, 5, 3], [1, 2, 3], [2.5, 0.061, 1.0])
    assert detail.startswith("greedy tokens differ from position 1 (the reference's top-2 logit gap there: 0.061):")
