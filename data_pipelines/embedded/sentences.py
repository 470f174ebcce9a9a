"""A tiny English sentence generator for the embedded corpus.

A handful of clause templates filled from hand-written word lists, chained with
conjunctions until a target word count is reached. The text only has to give
espeak varied phoneme sequences of a chosen length; it need not make sense.
"""

from __future__ import annotations

import numpy as np

_NAMES = ("Anna", "Boris", "Carla", "David", "Elena", "Felix", "Greta", "Hugo",
          "Irene", "Jonas", "Kemal", "Laura", "Marco", "Nadia", "Oscar",
          "Petra", "Quentin", "Rosa", "Samuel", "Tanya", "Victor", "Wanda")
_ADJECTIVES = ("small", "bright", "quiet", "heavy", "yellow", "ancient",
               "clever", "muddy", "gentle", "broken", "famous", "frozen",
               "narrow", "purple", "rapid", "silver", "tired", "wooden",
               "curious", "distant", "empty", "golden", "happy", "lonely")
_NOUNS = ("river", "garden", "teacher", "window", "bicycle", "mountain",
          "kitchen", "letter", "market", "engine", "village", "question",
          "blanket", "doctor", "island", "lantern", "orange", "pocket",
          "rabbit", "station", "thunder", "umbrella", "violin", "wagon",
          "basket", "candle", "dragon", "feather", "harbour", "journey")
_VERBS_PAST = ("carried", "painted", "followed", "noticed", "borrowed",
               "cleaned", "watched", "repaired", "visited", "described",
               "ignored", "measured", "opened", "pushed", "remembered",
               "finished", "found", "threw", "built", "chose", "kept", "sold")
_VERBS_INTRANS = ("waited", "laughed", "travelled", "whispered", "slept",
                  "arrived", "wandered", "shivered", "vanished", "returned")
_ADVERBS = ("slowly", "quickly", "quietly", "happily", "carefully", "rarely",
            "suddenly", "almost", "gently", "eagerly", "yesterday", "again")
_PLACES = ("near the station", "under the bridge", "behind the market",
           "across the valley", "inside the old house", "by the harbour",
           "at the edge of town", "on the third floor", "in the morning",
           "before the storm", "after dinner", "during the long winter")
_NUMBERS = ("two", "three", "four", "five", "seven", "eleven", "twenty",
            "forty", "ninety", "a hundred", "a dozen")
_CONJUNCTIONS = (", and", ", but", ", so", " because", " while", " although",
                 ", then")


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
  return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator) -> str:
  kind = int(rng.integers(4))
  if kind == 0:
    return _pick(rng, _NAMES)
  if kind == 1:
    return f"the {_pick(rng, _NOUNS)}"
  if kind == 2:
    return f"the {_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)}"
  return f"{_pick(rng, _NUMBERS)} {_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)}s"


def _clause(rng: np.random.Generator) -> str:
  kind = int(rng.integers(5))
  subject = _noun_phrase(rng)
  if kind == 0:
    return f"{subject} {_pick(rng, _VERBS_PAST)} {_noun_phrase(rng)}"
  if kind == 1:
    return f"{subject} {_pick(rng, _VERBS_INTRANS)} {_pick(rng, _PLACES)}"
  if kind == 2:
    return (f"{subject} {_pick(rng, _ADVERBS)} {_pick(rng, _VERBS_PAST)} "
            f"{_noun_phrase(rng)}")
  if kind == 3:
    return f"{subject} was {_pick(rng, _ADJECTIVES)} {_pick(rng, _PLACES)}"
  return f"{subject} {_pick(rng, _VERBS_INTRANS)} {_pick(rng, _ADVERBS)}"


def sentence(rng: np.random.Generator, num_words: int) -> str:
  """Text of about `num_words` words (at least one clause), with punctuation.

  Clauses are chained by conjunctions; now and then a full stop or a question
  mark starts a new sentence, so espeak's intonation and pauses vary.
  """
  sentences: list[str] = []
  current = ""
  words = 0
  while words < max(num_words, 1):
    clause = _clause(rng)
    words += len(clause.split())
    if not current:
      current = clause[0].upper() + clause[1:]
    else:
      current += f"{_pick(rng, _CONJUNCTIONS)} {clause}"
    if words >= num_words or rng.random() < 0.35:
      sentences.append(current + ("?" if rng.random() < 0.2 else "."))
      current = ""
  return " ".join(sentences)
