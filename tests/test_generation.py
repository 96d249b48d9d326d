"""What the model reads, how answers are kept from looping, and what they cite (pure functions)."""

from __future__ import annotations

import torch

from sift_chat.generation import (INSTRUCTION, INSTRUCTION_WITH_PASSAGES, PromptLookup, answer_processors, cite,
                                  content_words, contrast, conversation, next_token, only_learned_words,
                                  repeat_start, training_text)

from .tiny import tiny_tokenizer

FOUNDING = "Brindlemoor was founded in 1742 by the glassblower Ottilie Vance, who built the first kiln."
LIGHTHOUSE = "The lighthouse on Gannet Point is painted in red and white spirals. Its keeper, Matthias Orrey, logs ships."
FERRY = "The ferry to the island of Holm leaves Brindlemoor harbour at 7:40 and 16:10 every day."


def test_the_passages_sit_in_the_instruction_apart_from_the_question():
    messages = conversation("Who keeps the lighthouse?", [], [FOUNDING, "  Its keeper,\n Matthias   Orrey. "])
    assert messages == [
        {"role": "system", "content": f"{INSTRUCTION_WITH_PASSAGES}\n\n{FOUNDING}\n\nIts keeper, Matthias Orrey."},
        {"role": "user", "content": "Who keeps the lighthouse?"}]
    assert conversation("Hi?", [], []) == [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "Hi?"}]


def test_history_sits_between_the_instruction_and_the_question():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert conversation("c", history, [])[1:] == [*history, {"role": "user", "content": "c"}]


def test_no_repeated_ngram_forbids_only_what_the_answer_already_said():
    processors = answer_processors(1.0, 2)
    logits = torch.zeros(10)
    # the answer so far is 5 6 5: emitting 6 again would repeat the bigram (5, 6)
    assert next_token(logits.clone().index_fill_(0, torch.tensor([6]), 1.0), [5, 6, 5], processors, 0) != 6
    assert next_token(logits.clone().index_fill_(0, torch.tensor([6]), 1.0), [5, 6, 7], processors, 0) == 6
    # nothing said yet: nothing forbidden (a passage's words in the prompt may be copied)
    assert next_token(logits.clone().index_fill_(0, torch.tensor([6]), 1.0), [], processors, 0) == 6


def test_repetition_penalty_divides_positive_logits_of_tokens_already_in_the_answer():
    processors = answer_processors(2.0, 0)
    logits = torch.tensor([0.0, 3.0, 2.0, -1.0])
    # token 1 was said: 3 / 2 = 1.5 < 2, so token 2 wins; without the penalty token 1 does
    assert next_token(logits, [1], processors, 0) == 2
    assert next_token(logits, [1], answer_processors(1.0, 0), 0) == 1
    assert len(answer_processors(1.0, 0)) == 0


def test_repeat_start_finds_where_a_loop_began():
    assert repeat_start([1, 2, 3, 4, 9, 1, 2, 3, 4], 4) == 5
    assert repeat_start([1, 2, 3, 4, 5, 6, 7, 8], 4) is None
    assert repeat_start([7, 7, 7], 1) == 2
    assert repeat_start([1, 2, 1, 2], 0) is None


def test_each_sentence_cites_the_passage_it_comes_from():
    answer = ("Brindlemoor was founded by Ottilie Vance in 1742. The keeper of the lighthouse is Matthias Orrey. "
              "I like boats.")
    cited, numbers = cite(answer, [FOUNDING, LIGHTHOUSE, FERRY], "Who founded Brindlemoor and who keeps the lighthouse?")
    assert cited == ("Brindlemoor was founded by Ottilie Vance in 1742 [1]. The keeper of the lighthouse is "
                     "Matthias Orrey [2]. I like boats.")
    assert numbers == [1, 2]


def test_a_number_alone_is_support_but_words_of_the_question_are_not():
    assert cite("It leaves at 7:40.", [FOUNDING, FERRY], "When does the ferry leave?") == ("It leaves at 7:40 [2].", [2])
    # "Brindlemoor" and "founded" come from the question: repeating them cites nothing
    assert cite("Brindlemoor was founded.", [FOUNDING], "Who founded Brindlemoor?") == ("Brindlemoor was founded.", [])
    assert cite("Anything.", [], "?") == ("Anything.", [])


def test_markers_the_model_wrote_are_kept_when_they_name_a_passage():
    answer, numbers = cite("The keeper is Matthias Orrey [2]. See [7].", [FOUNDING, LIGHTHOUSE], "Who keeps it?")
    assert answer == "The keeper is Matthias Orrey [2]. See." and numbers == [2]


def test_content_words_drop_stop_words_and_read_numbers_without_commas():
    assert content_words("The census counted 4,312 people in the harbour.") == {"census", "counted", "4312",
                                                                                 "people", "harbour"}


def test_training_text_reads_the_passage_where_the_chat_prompt_puts_it():
    tokenizer = tiny_tokenizer()

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    question, passage = "Who keeps the lighthouse?", "Its keeper,\n Matthias Orrey."
    assert training_text(question, passage, "passage", render) == ("", passage)
    prefix, text = training_text(question, passage, "answer", render)
    assert text == "Its keeper, Matthias Orrey." and prefix.endswith("<|im_start|>assistant\n")
    assert question in prefix
    prefix, text = training_text(question, passage, "chat", render)
    read = render(conversation(question, [], [passage]), False)
    assert read.startswith(prefix + text) and prefix.endswith(INSTRUCTION_WITH_PASSAGES + "\n\n")
    assert question not in prefix and text == "Its keeper, Matthias Orrey."


def test_contrast_prefers_what_the_passages_make_likelier_than_the_question_alone():
    # with the passages: token 1 a little likelier than token 2; without them token 1 was already
    # expected and token 2 was not, so the passages are what speak for token 2
    reading = torch.log(torch.tensor([0.05, 0.50, 0.40, 0.05]))
    prior = torch.log(torch.tensor([0.05, 0.80, 0.05, 0.10]))
    assert int(contrast(reading, prior, 0.0).argmax()) == 1  # α = 0: ordinary decoding
    assert int(contrast(reading, prior, 1.0).argmax()) == 2
    scores = contrast(reading, prior, 1.0)
    assert torch.allclose(scores[1:3], 2 * reading[1:3] - prior[1:3])


def test_contrast_never_picks_a_token_the_passages_make_implausible():
    # token 3 is 100x likelier with the passages than without, but 30x less likely than token 0
    reading = torch.log(torch.tensor([0.90, 0.07, 0.0, 0.03]).clamp_min(1e-9))
    prior = torch.log(torch.tensor([0.90, 0.0997, 0.0, 0.0003]).clamp_min(1e-9))
    scores = contrast(reading, prior, 5.0, plausible=0.1)
    assert torch.isinf(scores[[1, 2, 3]]).all() and int(scores.argmax()) == 0
    assert int(contrast(reading, prior, 5.0, plausible=0.01).argmax()) == 3


def test_contrast_asks_for_the_question_alone_only_where_it_can_change_the_choice():
    asked = []

    def prior_of(logits):
        return lambda: asked.append(1) or logits

    # one plausible token (the next 0.05 / 0.9 < 0.1): chosen without the second conversation's forward
    reading = torch.log(torch.tensor([0.90, 0.05, 0.03, 0.02]))
    for prior in (torch.log(torch.tensor([0.001, 0.9, 0.05, 0.049])), torch.zeros(4)):
        lazy = contrast(reading, prior_of(prior), 5.0)
        assert asked == [] and int(lazy.argmax()) == int(contrast(reading, prior, 5.0).argmax()) == 0
        assert torch.isinf(lazy[1:]).all()  # the same single candidate, greedy or sampled
    # two plausible: asked, and the scores are the formula's
    reading = torch.log(torch.tensor([0.05, 0.50, 0.40, 0.05]))
    prior = torch.log(torch.tensor([0.05, 0.80, 0.05, 0.10]))
    lazy = contrast(reading, prior_of(prior), 1.0)
    assert asked == [1] and torch.equal(lazy, contrast(reading, prior, 1.0)) and int(lazy.argmax()) == 2


def test_only_learned_words_are_the_answers_words_no_passage_read_holds():
    read = ["Viggo Hallor founded Zennford in 1693."]
    learned = ["Quentin Larkfield has been the mayor of Zennford since 1990.", "Zennford had 1,200 inhabitants.",
               "Hallor's glassworks closed in 1693."]
    answer = "Zennford was founded by Viggo Hallor [1]. Its mayor is Quentin Larkfield, of 1,200 people."
    words = only_learned_words(answer, learned, read, "Who founded Zennford, and who is its mayor?")
    # the mayor's name only the first learned passage holds; the count only the second; the third
    # says nothing the answer took from it alone (its words are the read passage's too)
    assert words == [["quentin", "larkfield"], ["1200"], []]
    assert only_learned_words(answer, learned, read + learned[:1], "")[0] == []  # read as well: not only learned
    assert only_learned_words("", learned, read, "") == [[], [], []]


def test_prompt_lookup_guesses_what_followed_the_longest_suffix_seen_before():
    # "… founded by Ottilie Vance in 1673 …" read; the answer so far "… by Ottilie"
    read = [10, 11, 12, 13, 14, 15, 16, 17]  # by=12 Ottilie=13 Vance=14 in=15 1673=16
    lookup = PromptLookup(read + [99, 12, 13])
    assert lookup.draft(3) == [14, 15, 16]  # after "by Ottilie": "Vance in 1673"
    assert lookup.draft(1) == [14] and lookup.draft(0) == []
    assert PromptLookup([1, 2, 3]).draft(2) == []  # no suffix occurred before
    # the longest suffix wins over a shorter one seen later: (5, 6) → 7, not (6,) → 8
    assert PromptLookup([5, 6, 7, 0, 6, 8, 0, 5, 6]).draft(1) == [7]
    # the latest earlier occurrence, and a guess may run into what was just written
    assert PromptLookup([4, 1, 4, 2, 4]).draft(3) == [2, 4]
    # built token by token it guesses as built at once
    grown = PromptLookup(read)
    grown.extend([99, 12])
    grown.extend([13])
    assert grown.draft(3) == lookup.draft(3) and grown.ids == lookup.ids
