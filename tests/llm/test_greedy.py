"""How a greedy continuation is compared with the stored one (edgeq/llm/greedy.py)."""

import pytest

from edgeq.errors import ModelFolderError
from edgeq.llm.greedy import VERIFY_PROMPT, match_tokens, verify_prompt_ids


def test_match_tokens_says_where_tokens_first_differ():
    assert match_tokens([1, 2, 3], [1, 2, 3]) == (True, "3 greedy tokens equal the reference")
    same, detail = match_tokens([1, 5, 3], [1, 2, 3])
    assert not same and detail.startswith("greedy tokens differ from position 1:")
    assert match_tokens([1, 2], [1, 2, 3])[1].startswith("greedy tokens differ from position 2:")  # EOS came early
    same, detail = match_tokens([1, 5, 3], [1, 2, 3], [2.5, 0.061, 1.0])
    assert detail.startswith("greedy tokens differ from position 1 (the reference's top-2 logit gap there: 0.061):")


def _tokenizer(template):
    from transformers import PreTrainedTokenizerFast

    from tests.llm.tiny_llama import BOS, BOS_ID, EOS, train_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS)
    tok.chat_template = template
    return tok, BOS_ID


def test_verify_prompt_goes_through_the_chat_template_or_is_plain_text_for_a_base_model():
    from tests.llm.tiny_llama import CHAT_TEMPLATE

    chat, bos = _tokenizer(CHAT_TEMPLATE)
    ids = verify_prompt_ids(chat)
    assert chat.decode(ids) == f"<|im_start|>user\n{VERIFY_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    base, _ = _tokenizer(None)  # no template: the prompt as text, with the tokenizer's BOS, not a traceback
    ids = verify_prompt_ids(base)
    assert ids[0] == bos and base.decode(ids[1:]) == VERIFY_PROMPT


def test_a_chat_template_that_fails_is_refused_with_the_fix():
    broken, _ = _tokenizer("{{ raise_exception('no user turns here') }}")
    with pytest.raises(ModelFolderError, match="chat template fails") as e:
        verify_prompt_ids(broken)
    assert "chat_template" in e.value.hint
