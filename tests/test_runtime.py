"""edgeq.runtime: tokenizer -> feeds, pooling by hand-computed examples, and batched embedding on the tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.modelsource import inspect_model_dir
from edgeq.runtime import BATCH, batches, embed, encode, pool, session
from edgeq.stages.export import export
from edgeq.textdata import EVALUATION_FILE, load_texts

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "ok", "How do I replace the inner tube on a bike?"]


@pytest.fixture(scope="module")
def exported(tiny_bert_dir, tmp_path_factory):
    return export(inspect_model_dir(tiny_bert_dir), tmp_path_factory.mktemp("runtime-work"))


@pytest.fixture(scope="module")
def tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(exported.tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer_without_token_types(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported.tokenizer_dir), local_files_only=True,
                                        model_input_names=["input_ids", "attention_mask"])
    assert "token_type_ids" not in tok(TEXTS)
    return tok


@pytest.fixture(scope="module")
def sess(exported):
    return session(exported.onnx_path)


# --- encode ---------------------------------------------------------------------------------------------------------


@pytest.mark.encoders
def test_encode_gives_int64_feeds_in_input_order(tokenizer):
    feeds = encode(tokenizer, TEXTS, 128, NAMES)
    assert list(feeds) == NAMES
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    for name in NAMES:
        assert feeds[name].dtype == np.int64
        np.testing.assert_array_equal(feeds[name], enc[name])
    assert feeds["attention_mask"].sum(1).tolist() == [len(tokenizer(t)["input_ids"]) for t in TEXTS]


@pytest.mark.encoders
def test_encode_fills_token_type_ids_with_zeros(tokenizer_without_token_types, tokenizer):
    feeds = encode(tokenizer_without_token_types, TEXTS, 128, NAMES)
    assert list(feeds) == NAMES
    tt = feeds["token_type_ids"]
    assert tt.dtype == np.int64 and tt.shape == feeds["input_ids"].shape
    assert not tt.any()
    # the same ids and mask as a tokenizer that does produce token types
    full = encode(tokenizer, TEXTS, 128, NAMES)
    np.testing.assert_array_equal(feeds["input_ids"], full["input_ids"])
    np.testing.assert_array_equal(feeds["attention_mask"], full["attention_mask"])


@pytest.mark.encoders
def test_encode_feeds_only_the_model_inputs(tokenizer):
    feeds = encode(tokenizer, TEXTS, 128, ["input_ids", "attention_mask"])
    assert list(feeds) == ["input_ids", "attention_mask"]


@pytest.mark.encoders
def test_encode_raises_key_error_for_an_unknown_input(tokenizer):
    with pytest.raises(KeyError, match="pixel_values"):
        encode(tokenizer, TEXTS, 128, ["input_ids", "pixel_values"])


@pytest.mark.encoders
def test_encode_truncates_to_seq_len(tokenizer):
    feeds = encode(tokenizer, ["word " * 500, "short"], 16, NAMES)
    assert feeds["input_ids"].shape == (2, 16)
    assert feeds["input_ids"][0, -1] == tokenizer.sep_token_id  # truncated, still closed by [SEP]


@pytest.mark.encoders
def test_batches_split_in_order(tokenizer):
    texts = load_texts(EVALUATION_FILE).head(BATCH + 4)
    sizes = [len(b["input_ids"]) for b in batches(tokenizer, texts, 32, NAMES)]
    assert sizes == [BATCH, 4]
    sizes = [len(b["input_ids"]) for b in batches(tokenizer, texts, 32, NAMES, batch=7)]
    assert sizes == [7, 7, 6]


# --- pool -----------------------------------------------------------------------------------------------------------


def hidden_and_mask() -> tuple[np.ndarray, np.ndarray]:
    hidden = np.array([
        [[1.0, 2.0], [3.0, 6.0], [1e6, -1e6]],  # last position is padding: a huge value that must not leak in
        [[4.0, -8.0], [1e6, 1e6], [-1e6, 5.0]],  # only the first token is real
    ], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    return hidden, mask


def test_mean_pool_ignores_padding_exactly():
    hidden, mask = hidden_and_mask()
    out = pool(hidden, mask, "mean")
    np.testing.assert_array_equal(out, np.array([[2.0, 4.0], [4.0, -8.0]], np.float32))  # (1+3)/2, (2+6)/2; row 2 as is
    assert out.dtype == np.float32
    assert np.array_equal(pool(hidden, mask), out)  # mean is the default


def test_mean_pool_of_an_all_padding_row_is_zero_not_nan():
    hidden, _ = hidden_and_mask()
    out = pool(hidden, np.zeros((2, 3), np.int64), "mean")
    assert np.isfinite(out).all() and not out.any()


def test_cls_pool_takes_token_zero():
    hidden, mask = hidden_and_mask()
    out = pool(hidden, mask, "cls")
    np.testing.assert_array_equal(out, np.array([[1.0, 2.0], [4.0, -8.0]], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(pool(hidden, np.zeros_like(mask), "cls"), out)  # the mask plays no part


# --- embed ----------------------------------------------------------------------------------------------------------


class CountingSession:
    """An InferenceSession stand-in that counts run() calls and batch sizes."""

    def __init__(self, sess) -> None:
        self.sess = sess
        self.batch_sizes: list[int] = []

    def get_inputs(self):
        return self.sess.get_inputs()

    def run(self, outputs, feeds):
        self.batch_sizes.append(len(feeds["input_ids"]))
        return self.sess.run(outputs, feeds)


# Measured: batched and one-by-one embeddings of these 20 texts are identical (max |diff| 0.0, values up to 1.8):
# padding only lengthens the sequence, masked keys get a float32-minimum bias so softmax gives them exactly zero
# weight, and mean pooling drops padded rows. 1e-5 allows a different MatMul blocking for a different batch shape
# (ulp-level, ~1e-7 here) and still fails if padding leaked into a real token or rows were mixed up.
EMBED_ATOL = 1e-5


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.encoders
def test_embed_over_several_batches_equals_per_text_embedding(sess, tokenizer, pooling):
    texts = load_texts(EVALUATION_FILE).head(BATCH + 4)
    lengths = {len(tokenizer(t)["input_ids"]) for t in texts}
    assert len(lengths) > 5  # varied lengths: each batch is padded
    counting = CountingSession(sess)
    together = embed(counting, tokenizer, texts, 128, pooling)
    assert counting.batch_sizes == [BATCH, 4]
    assert together.shape == (BATCH + 4, 64)
    one_by_one = np.concatenate([embed(sess, tokenizer, [t], 128, pooling) for t in texts])
    np.testing.assert_allclose(together, one_by_one, rtol=0, atol=EMBED_ATOL)
    assert len({row.tobytes() for row in together}) == len(texts)  # distinct texts, distinct rows
