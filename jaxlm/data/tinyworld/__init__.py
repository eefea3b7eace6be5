"""TinyWorld: a seeded toy world small enough to run the whole LM pipeline on a laptop.

Nothing is downloaded: the world, its web (pretraining corpus), its instruction tasks with
imperfect demonstrations, the gold judge that stands in for human raters, Bradley-Terry labelled
preference pairs, red-team prompts and a constitution are all generated here from one seed, in a
closed vocabulary of about 400 words, so a ~2M-parameter model learns the language in minutes.

    world.py         people, things, places and facts; the closed vocabulary
    corpus.py        the pretraining corpus (stories, facts, sums, lists, rude talk; no Q&A)
    templates.py     every kind of request, parsed back from its text, with its ideal answer
    constitution.py  principles for critique, revision and choice, and their prompt formats
    judge.py         score(prompt, response) -> JudgeResult; ideal_response(prompt)
    flaws.py         how annotators get answers wrong (wrong, refuse, verbose, curt, rude)
    tasks.py         SFT demonstrations, held-out eval prompts, RL and red-team prompts, CAI's
                     few-shot worked revisions
    preferences.py   pairs labelled with known Bradley-Terry noise, their Bayes accuracy and the
                     accuracy of a judge blind to content
    make.py          make_all(out_dir, ...): every file, as tools/make_tinyworld.py writes them
"""

from jaxlm.data.tinyworld.constitution import PRINCIPLES
from jaxlm.data.tinyworld.corpus import corpus_documents, write_corpus, write_corpus_splits
from jaxlm.data.tinyworld.judge import JudgeResult, content_blind_score, ideal_response, score
from jaxlm.data.tinyworld.make import make_all
from jaxlm.data.tinyworld.preferences import (bayes_accuracy, content_blind_accuracy,
                                              pairs_from_perturbations, pairs_from_samples)
from jaxlm.data.tinyworld.tasks import eval_prompts, few_shot_revisions, redteam_prompts, sft_examples
from jaxlm.data.tinyworld.world import VOCABULARY, World

__all__ = [
    "PRINCIPLES", "corpus_documents", "write_corpus", "write_corpus_splits", "JudgeResult",
    "ideal_response", "score", "content_blind_score", "make_all", "bayes_accuracy",
    "content_blind_accuracy", "pairs_from_perturbations", "pairs_from_samples", "eval_prompts",
    "few_shot_revisions", "redteam_prompts", "sft_examples", "VOCABULARY", "World",
]
