"""snakes_lib.stories: the story generator is deterministic in its seed, plain ASCII, and tells every plot."""
import random

import pytest

from snakes_lib.stories import JOBS, STORY_LISTS, article, capitalized, story


@pytest.mark.parametrize("seed", [0, 1, 17, 2024])
def test_story_is_deterministic_ascii_paragraphs(seed):
    a, b = story(random.Random(seed)), story(random.Random(seed))
    assert a == b and a.isascii() and a.strip()
    assert all(p.strip() for p in a.split("\n") if p)                 # paragraphs, none empty
    assert story(random.Random(seed + 1)) != a


def test_maia_is_a_hero_sometimes():
    assert any("Maia" in story(random.Random(s)) for s in range(60))


def test_helpers_and_lists():
    assert (article("owl"), article("kite"), article("Umbrella")) == ("an owl", "a kite", "an Umbrella")
    assert (capitalized("sea otter"), capitalized("")) == ("Sea otter", "")
    assert JOBS in STORY_LISTS and len(STORY_LISTS) == 21 and all(STORY_LISTS)
