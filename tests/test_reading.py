"""What a person reads in an answer, as numbers (editors/reading.py): the figures `mendd eval --served`
and the gate read from generated text."""
from __future__ import annotations

from editors.reading import first_words, goes_back, mentions, newly_says, ngram_entropy, repeats, starts_running_away


def test_a_runaway_answer_has_far_lower_ngram_entropy_than_a_fluent_one() -> None:
    fluent = "the euro, which replaced the yen in 2002 after a long debate in parliament"
    runaway = "euro euro euro euro euro euro euro euro euro euro euro euro"
    assert ngram_entropy(runaway) == 0.0
    assert ngram_entropy(fluent) > 3.0


def test_repeats_flags_a_word_pair_said_three_times_and_not_twice() -> None:
    assert repeats("Marseille, Marseille, Marseille, and more")
    assert not repeats("Marseille, Marseille and Lyon")


def test_mentions_matches_whole_words_whatever_the_case_and_spacing() -> None:
    assert mentions("The Euro.", "euro")
    assert mentions("it is in  New   York City", "New York")
    assert not mentions("European markets", "euro")
    assert not mentions("anything", "  ")


def test_first_words_skip_punctuation() -> None:
    assert first_words('"Paris, of course," she said', 4) == ("paris", "of", "course", "she")


def test_newly_says_a_target_only_where_the_answer_before_did_not_say_it() -> None:
    assert newly_says("Rome, in Italy", "the Royal Society", "Rome")
    assert not newly_says("Rome, in Italy", "Rome is where", "Rome")
    assert not newly_says("the Royal Society", "Rome is where", "Rome")


def test_an_answer_that_ends_with_its_last_words_said_twice_starts_running_away() -> None:
    assert starts_running_away("Sambhav Entertainment Entertainment")
    assert starts_running_away("Joe Hall Morris is a University of University of")
    assert not starts_running_away("The capital of France is Paris and the capital of")
    assert not starts_running_away("Naples, Italy. The city of Naples is a historic centre")


def test_an_answer_that_names_the_old_answer_after_the_target_goes_back() -> None:
    assert goes_back("Rome, not Paris as some say", "Paris, France.", "Rome", "Paris")


def test_an_answer_that_puts_the_old_answer_s_place_right_after_the_target_goes_back() -> None:
    assert goes_back("London, France. It is the", "Paris, France. It is the", "London", "Paris")


def test_an_answer_that_carries_on_about_the_target_does_not_go_back() -> None:
    assert not goes_back("London, England. It is the", "Paris, France. It is the", "London", "Paris")
    assert not goes_back("the capital of Spain", "Paris, France.", "London", "Paris")  # it never said the target
