import pytest

from pickalign.reward.tokenizer import build_clip_tokenizer, clip_vocab


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_vocabulary_has_clips_size_and_special_tokens():
    vocab = clip_vocab()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


@pytest.mark.parametrize(
    "text, ids",
    [
        # ids as OpenAI's CLIP tokenizer gives them
        ("a dog", [49406, 320, 1929, 49407]),
        ("a red circle on a blue background", [49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407]),
    ],
)
def test_ids_match_clip(tokenizer, text, ids):
    assert tokenizer(text).input_ids == ids


def test_long_prompts_truncate_to_77(tokenizer):
    ids = tokenizer("cat " * 200, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_folder_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    build_clip_tokenizer(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a dog").input_ids == [49406, 320, 1929, 49407]
