"""Every prompt form ``NeoX.generate`` accepts (text, token ids, tensors, arrays, batches of them) gives the same
result as the same prompt as text, one result for one prompt and a list for a batch; every other form is one
clear ``NeoxRtError``. Runs the embedded default model on the CPU, greedy, a few tokens."""
import numpy as np
import pytest
import torch

from neox_rt import NeoxRtError
from neox_rt.default_model import load_default
from neox_rt.engine.generation import GenerationResult, normalize_prompts

TEXT = "def fibonacci(n):"
OTHER = "import os\n"
N = 6


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_default(device="cpu", notice=False)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode(TEXT)


@pytest.fixture(scope="module")
def other_ids(model):
    return model.tokenizer.encode(OTHER)


@pytest.fixture(scope="module")
def expected(model):
    """Greedy continuations of TEXT alone and of the batch [TEXT, OTHER], from the text."""
    one = model.generate(TEXT, max_new_tokens=N)
    pair = model.generate([TEXT, OTHER], max_new_tokens=N)
    assert isinstance(one, GenerationResult) and len(one.token_ids) > 0
    return one, pair


def same(result, want):
    assert isinstance(result, GenerationResult), type(result)
    assert result.token_ids == want.token_ids and result.text == want.text
    assert result.prompt_ids == want.prompt_ids


def same_batch(results, want):
    assert isinstance(results, list) and len(results) == len(want)
    for r, w in zip(results, want):
        same(r, w)


def generate(model, prompts):
    return model.generate(prompts, max_new_tokens=N)


# -- accepted: one prompt -------------------------------------------------------------------------------------
def test_str_is_one_prompt(model, expected):
    same(generate(model, TEXT), expected[0])


def test_list_of_ints_is_one_prompt(model, ids, expected):
    same(generate(model, ids), expected[0])


def test_tuple_of_ints_is_one_prompt(model, ids, expected):
    same(generate(model, tuple(ids)), expected[0])


def test_1d_tensor_is_one_prompt(model, ids, expected):
    same(generate(model, torch.tensor(ids)), expected[0])


def test_1d_int32_tensor_is_one_prompt(model, ids, expected):
    same(generate(model, torch.tensor(ids, dtype=torch.int32)), expected[0])


def test_1d_numpy_array_is_one_prompt(model, ids, expected):
    same(generate(model, np.array(ids, dtype=np.int64)), expected[0])


def test_numpy_integers_in_a_list(model, ids, expected):
    same(generate(model, [np.int32(i) for i in ids]), expected[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_tensor_on_another_device_is_moved_to_cpu(model, ids, expected):
    same(generate(model, torch.tensor(ids, device="cuda")), expected[0])


# -- accepted: a batch ----------------------------------------------------------------------------------------
def test_list_of_str_is_a_batch(model, expected):
    same_batch(generate(model, [TEXT, OTHER]), expected[1])


def test_list_of_one_str_is_a_batch_of_one(model, expected):
    same_batch(generate(model, [TEXT]), [expected[0]])


def test_list_of_id_lists_is_a_batch(model, ids, other_ids, expected):
    same_batch(generate(model, [ids, other_ids]), expected[1])


def test_str_and_ids_mixed_in_a_batch(model, ids, other_ids, expected):
    same_batch(generate(model, [TEXT, other_ids]), expected[1])
    same_batch(generate(model, [ids, OTHER]), expected[1])


def test_list_of_1d_tensors_is_a_batch(model, ids, other_ids, expected):
    same_batch(generate(model, [torch.tensor(ids), np.array(other_ids)]), expected[1])


def test_2d_tensor_is_a_batch(model, ids, expected):
    same_batch(generate(model, torch.tensor([ids, ids])), [expected[0], expected[0]])


def test_2d_numpy_array_is_a_batch(model, ids, expected):
    same_batch(generate(model, np.array([ids, ids])), [expected[0], expected[0]])


def test_empty_batch_gives_empty_list(model):
    assert generate(model, []) == []
    assert generate(model, ()) == []
    assert generate(model, torch.empty(0, 4, dtype=torch.long)) == []


def test_empty_prompt_starts_from_endoftext_in_every_form(model):
    """"" and an empty id prompt (in a batch, or an empty 1-D tensor) all start from <|endoftext|>."""
    eos = model.tokenizer.eos_id
    want = generate(model, [[eos]])[0]
    assert want.prompt_ids == [eos]
    same(generate(model, ""), want)
    same(generate(model, torch.tensor([], dtype=torch.long)), want)
    same_batch(generate(model, ["", []]), [want, want])


def test_score_accepts_text_ids_and_tensor(model, ids):
    want = model.score(TEXT)
    assert want[0] == ids
    assert model.score(ids) == want
    assert model.score(torch.tensor(ids)) == want


def test_normalize_prompts_forms():
    assert normalize_prompts("a") == (["a"], True)
    assert normalize_prompts([1, 2]) == ([[1, 2]], True)
    assert normalize_prompts(torch.tensor([[1, 2], [3, 4]])) == ([[1, 2], [3, 4]], False)
    batch, single = normalize_prompts(["a", [1], torch.tensor([2, 3])])
    assert batch == ["a", [1], [2, 3]] and not single
    assert all(type(i) is int for i in normalize_prompts(np.array([5, 6], dtype=np.uint8))[0][0])


# -- rejected -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (None, r"prompts is NoneType None; accepted: a str"),
    ({"text": "hi"}, r"prompts is dict \{'text': 'hi'\}; accepted"),
    (3.5, r"prompts is float 3.5; accepted"),
    (7, r"prompts is int 7; accepted"),
    (b"def f", r"prompts is bytes b'def f'; accepted"),
    ([1, "a"], r"prompts is a list mixing token ids \(ints\) with str 'a' \(item 1\)"),
    (["a", 1], r"prompts is a list mixing token ids \(ints\) with str 'a' \(item 0\)"),
    ([True, False], r"prompt 0 of the batch is bool True \(a bool is not a token id\)"),
    ([1, True], r"mixing token ids \(ints\) with bool True \(a bool is not a token id\) \(item 1\)"),
    ([[1, 2], [False]], r"prompt 1 of the batch is a list of token ids but item 0 is bool False"),
    ([1.0, 2.0], r"prompt 0 of the batch is float 1.0; accepted"),
    ([1, 2.0], r"mixing token ids \(ints\) with float 2.0 \(item 1\)"),
    (["a", None], r"prompt 1 of the batch is NoneType None; accepted"),
    ([[1, 2], [3, "x"]], r"prompt 1 of the batch is a list of token ids but item 1 is str 'x'"),
    ([[[1, 2]]], r"prompt 0 of the batch is a list of token ids but item 0 is list \[1, 2\]"),
    (torch.tensor([1.0, 2.0]), r"the prompt is a 1-D Tensor of torch.float32 with shape \(2,\): token ids must have "
                               r"an integer dtype"),
    (torch.tensor([True, False]), r"the prompt is a 1-D Tensor of torch.bool with shape \(2,\)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"prompts is a 3-D Tensor of torch.int64 with shape \(1, 2, 3\): a "
                                             r"tensor of token ids must be 1-D \(one prompt\) or 2-D"),
    (torch.tensor(5), r"prompts is a 0-D Tensor of torch.int64 with shape \(\)"),
    (np.array([0.5]), r"the prompt is a 1-D ndarray of float64 with shape \(1,\): token ids must have an "
                      r"integer dtype"),
    ([torch.zeros(2, 2, dtype=torch.long)], r"prompt 0 of the batch is a 2-D Tensor .*one prompt of token ids "
                                            r"must be 1-D"),
])
def test_rejected_form(model, bad, match):
    with pytest.raises(NeoxRtError, match=match) as info:
        model.generate(bad, max_new_tokens=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make, where, bad_id", [
    (lambda v: [3, -1, 4], "the prompt", -1),
    (lambda v: [3, v], "the prompt", "{v}"),
    (lambda v: [[1, 2], [v + 5]], "prompt 1 of the batch", "{v5}"),
    (lambda v: torch.tensor([[1, 2], [-7, 2]]), "prompt 1 of the batch", -7),
    (lambda v: torch.tensor([1, v]), "the prompt", "{v}"),
])
def test_out_of_vocabulary_ids_name_the_id_and_the_vocabulary(model, make, where, bad_id):
    v = model.config.vocab_size
    bad = str(bad_id).format(v=v, v5=v + 5)
    with pytest.raises(NeoxRtError, match=rf"{where}: token id {bad} at position \d+ is outside the model's "
                                          rf"vocabulary of {v} ids \(0\.\.{v - 1}\)"):
        model.generate(make(v), max_new_tokens=2)


def test_score_rejects_a_batch_and_bad_ids(model):
    with pytest.raises(NeoxRtError, match=r"the text to score is a list of token ids but item 0 is str"):
        model.score(["a", "b"])
    with pytest.raises(NeoxRtError, match=r"the text to score: token id -2"):
        model.score([1, -2])
