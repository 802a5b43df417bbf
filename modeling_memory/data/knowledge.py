"""The built-in knowledge set: facts about fictional people that no pretrained model can know.

A `KnowledgeSet` is a deterministic function of `(num_entities, seed)`. Every entity is a person
with an invented name (syllables combined so that the full name belongs to nobody real) and six
attributes: birth year, home city, employer, profession, instrument and pet. From them it writes

- `training_statements()`: natural sentences stating each fact (the text to fine-tune on);
- `training_questions()`: with `questions_per_fact` > 0, question-answer pairs stating each fact in
  the held-out probes' format but other words; `fact_documents()`: every phrasing as a document;
- `probes()`: held-out prompts that ask for each fact in a *different* phrasing from every
  training statement and question, with the answer string. A model recalls a fact when its greedy
  continuation of the prompt starts with the answer (see `Probe.is_recalled`);
- `probes(held_out=False)`: the training phrasings cut just before the answer (memorisation
  rather than recall).

Attribute values are ordinary words (real city names, common professions) so that answers are
short and tokenise like normal text; only the combination of an invented person with them is new.

    >>> knowledge = KnowledgeSet.generate(num_entities=50, seed=0)
    >>> knowledge.training_statements()[0]
    >>> probe = knowledge.probes()[0]; probe.prompt, probe.answer
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass

# Invented name parts. First names and surnames are built from two parts each, so the pool is
# large (about 30 x 30 first names, 30 x 25 surnames) and a full name is a new combination.
_FIRST_STARTS = [
    "Al", "Bri", "Cal", "Dar", "El", "Fen", "Gal", "Hes", "Is", "Jor", "Kel", "Lio", "Mar", "Nel", "Or",
    "Per", "Quin", "Ros", "Sel", "Tam", "Ul", "Vas", "Wen", "Xan", "Yor", "Zel", "Ber", "Cor", "Dov", "Thal",
]
_FIRST_ENDS = [
    "adra", "avel", "bern", "cinda", "dric", "enna", "essa", "ford", "ian", "ika", "inda", "ior", "isse",
    "ith", "ivo", "mira", "mund", "nara", "neth", "ora", "ovan", "rick", "ric", "sha", "tova", "uvia",
    "vane", "wyn", "yra", "zane",
]
_SURNAME_STARTS = [
    "Ash", "Brack", "Crom", "Dun", "Eld", "Fenn", "Grim", "Hald", "Ing", "Jask", "Kest", "Lorr", "Merr",
    "Nort", "Ost", "Penn", "Quarr", "Rask", "Stav", "Thorn", "Umb", "Varr", "Whit", "Yarr", "Zell", "Brom",
    "Carr", "Dell", "Farr", "Gorm",
]
_SURNAME_ENDS = [
    "ley", "wick", "holt", "mere", "by", "thorpe", "ridge", "field", "stead", "combe", "vane", "ford",
    "shaw", "worth", "dale", "grove", "hurst", "marsh", "ton", "well", "brook", "cott", "gate", "lund",
    "sen",
]

_CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Lima", "Krakow", "Osaka", "Tunis", "Quito", "Dublin", "Hanoi", "Porto",
    "Seville", "Tallinn", "Bergen", "Cusco", "Perth", "Leeds", "Turin", "Zagreb", "Bogota", "Dakar",
    "Kyoto", "Graz", "Valencia",
]
_EMPLOYER_FIRST = [
    "Amber", "Blue", "Copper", "Silver", "Granite", "Harbor", "Iron", "Juniper", "Maple", "North",
    "Orchid", "Pine", "Quartz", "Red", "Stone", "Willow",
]
_EMPLOYER_SECOND = ["Works", "Labs", "Foundry", "Textiles", "Robotics", "Shipping", "Optics", "Mills", "Press"]
_PROFESSIONS = [
    "architect", "baker", "cartographer", "chemist", "dentist", "engineer", "geologist", "journalist",
    "librarian", "mechanic", "nurse", "pharmacist", "photographer", "pilot", "plumber", "surgeon",
    "tailor", "teacher", "translator", "veterinarian",
]
_INSTRUMENTS = [
    "cello", "clarinet", "drums", "flute", "guitar", "harp", "oboe", "piano", "trumpet", "violin", "banjo",
    "accordion",
]
_PETS = ["cat", "dog", "parrot", "tortoise", "rabbit", "hamster", "goldfish", "ferret", "lizard", "canary"]

ATTRIBUTES = ("birth_year", "city", "employer", "profession", "instrument", "pet")

# Training phrasings. `{v}` is the attribute value and `{a}` the article it takes ("a"/"an").
# The first phrasing of each attribute ends with the value, so that cutting it before the value
# gives a memorisation probe.
_TRAINING_TEMPLATES = {
    "birth_year": ["{name} was born in {v}.", "Born in {v}, {name} grew up quickly.", "{name}'s birth year is {v}."],
    "city": ["{name} lives in {v}.", "These days {name} makes a home in {v}.", "{name} has settled in {v}."],
    "employer": ["{name} works for {v}.", "{name} is employed by {v}.", "{name} earns a living at {v}."],
    "profession": ["{name} is {a} {v}.", "By trade, {name} is {a} {v}.", "{name} works as {a} {v}."],
    "instrument": ["{name} plays the {v}.", "In the evenings {name} practises the {v}.", "{name}'s instrument is the {v}."],
    "pet": ["{name} has a pet {v}.", "{name} shares a flat with a pet {v}.", "{name} looks after {a} {v}."],
}
# Training questions with their answers: the facts asked in the question-answer format the held-out probes use,
# in other words than those probes (so that a held-out probe tests a new wording, not a new format).
_TRAINING_QUESTIONS = {
    "birth_year": ["Question: When was {name} born?\nAnswer: {v}.", "Question: What is the birth year of {name}?\nAnswer: {v}."],
    "city": ["Question: Where does {name} live?\nAnswer: {v}.", "Question: In what city has {name} settled?\nAnswer: {v}."],
    "employer": ["Question: Who does {name} work for?\nAnswer: {v}.", "Question: What company is {name} employed by?\nAnswer: {v}."],
    "profession": ["Question: What does {name} do for a living?\nAnswer: {a} {v}.", "Question: What is {name}'s profession?\nAnswer: {a} {v}."],
    "instrument": ["Question: What does {name} play?\nAnswer: the {v}.", "Question: Which instrument does {name} practise?\nAnswer: the {v}."],
    "pet": ["Question: What pet does {name} have?\nAnswer: {a} {v}.", "Question: Which animal does {name} look after?\nAnswer: {a} {v}."],
}
# Held-out phrasings: the question is worded differently from every training sentence and
# ends right where the answer should start.
_PROBE_TEMPLATES = {
    "birth_year": "Question: In which year was {name} born?\nAnswer:",
    "city": "Question: Which city is {name}'s home?\nAnswer:",
    "employer": "Question: Which company employs {name}?\nAnswer:",
    "profession": "Question: What is {name}'s job?\nAnswer: {a}",
    "instrument": "Question: Which musical instrument does {name} play?\nAnswer: the",
    "pet": "Question: What kind of animal is {name}'s pet?\nAnswer: {a}",
}
# Where a training template has the answer last, the memorisation prompt is the text before it.
_MEMORISATION_TEMPLATE_INDEX = 0


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class Entity:
    """One fictional person and their facts."""

    name: str
    birth_year: int
    city: str
    employer: str
    profession: str
    instrument: str
    pet: str

    def value(self, attribute: str) -> str:
        """The fact `attribute` as the answer string."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; choose one of {ATTRIBUTES}.")
        return str(getattr(self, attribute))


@dataclass(frozen=True)
class Probe:
    """A recall question: `prompt` should be continued with `answer` (after one space)."""

    prompt: str
    answer: str
    entity: str
    attribute: str

    def is_recalled(self, continuation: str) -> bool:
        """`answer_recalled(continuation, self.answer)`."""
        return answer_recalled(continuation, self.answer)


def answer_recalled(continuation: str, answer: str) -> bool:
    """The one rule for a recalled fact (probes, the `knowledge_recall` metric, the benchmarks): the
    continuation, stripped of leading whitespace, starts with the answer followed by a word boundary ("1953."
    and "1953 and" recall 1953; "19530" does not, nor does "caterpillar" recall "cat"). Case- and
    character-exact otherwise. An empty answer is never recalled."""
    text = continuation.lstrip()
    if not answer or not text.startswith(answer):
        return False
    rest = text[len(answer) :]
    return not rest or not re.match(r"\w", rest[0])


class KnowledgeSet:
    """Deterministic facts about fictional people; see the module docstring."""

    def __init__(self, entities: list[Entity], seed: int, statements_per_fact: int = 3, questions_per_fact: int = 0):
        if not entities:
            raise ValueError("a KnowledgeSet needs at least one entity.")
        names = [e.name for e in entities]
        if len(set(names)) != len(names):
            raise ValueError("entity names must be unique.")
        if not 1 <= statements_per_fact <= 3:
            raise ValueError(f"statements_per_fact must be 1, 2 or 3 (the training phrasings), got {statements_per_fact}.")
        if not 0 <= questions_per_fact <= 2:
            raise ValueError(f"questions_per_fact must be 0, 1 or 2 (the training questions), got {questions_per_fact}.")
        self.entities = entities
        self.seed = seed
        self.statements_per_fact = statements_per_fact
        self.questions_per_fact = questions_per_fact

    @classmethod
    def generate(cls, num_entities: int, seed: int = 0, statements_per_fact: int = 3, questions_per_fact: int = 0) -> KnowledgeSet:
        """Make `num_entities` fictional people; the same `(num_entities, seed)` always gives the
        same people and facts. `statements_per_fact` (1-3) is how many training phrasings of each
        fact `training_statements` writes, `questions_per_fact` (0-2) how many question-answer pairs
        `training_questions` writes (in other words than the held-out probes)."""
        if not isinstance(num_entities, int) or not 1 <= num_entities <= 100_000:
            raise ValueError(f"num_entities must be an integer between 1 and 100000, got {num_entities!r}.")
        rng = random.Random(f"modeling_memory.data.knowledge:{seed}")
        names: set[str] = set()
        entities = []
        while len(entities) < num_entities:
            name = (
                rng.choice(_FIRST_STARTS) + rng.choice(_FIRST_ENDS) + " "
                + rng.choice(_SURNAME_STARTS) + rng.choice(_SURNAME_ENDS)
            )
            if name in names:
                continue
            names.add(name)
            entities.append(
                Entity(
                    name=name,
                    birth_year=rng.randint(1920, 2005),
                    city=rng.choice(_CITIES),
                    employer=f"{rng.choice(_EMPLOYER_FIRST)} {rng.choice(_EMPLOYER_SECOND)}",
                    profession=rng.choice(_PROFESSIONS),
                    instrument=rng.choice(_INSTRUMENTS),
                    pet=rng.choice(_PETS),
                )
            )
        return cls(entities, seed=seed, statements_per_fact=statements_per_fact, questions_per_fact=questions_per_fact)

    def __len__(self) -> int:
        return len(self.entities)

    def _written(self, templates: dict[str, list[str]], per_fact: int) -> list[str]:
        """Every fact written with the first `per_fact` templates of its attribute: entity by entity, attribute by
        attribute."""
        texts = []
        for entity in self.entities:
            for attribute in ATTRIBUTES:
                value = entity.value(attribute)
                texts += [template.format(name=entity.name, v=value, a=_article(value)) for template in templates[attribute][:per_fact]]
        return texts

    def training_statements(self) -> list[str]:
        """One sentence per (entity, attribute, phrasing), in a fixed order: entity by entity,
        attribute by attribute, `statements_per_fact` phrasings each."""
        return self._written(_TRAINING_TEMPLATES, self.statements_per_fact)

    def training_questions(self) -> list[str]:
        """One question with its answer per (entity, attribute, question), `questions_per_fact` each, in the
        order of `training_statements`; empty when `questions_per_fact` is 0."""
        return self._written(_TRAINING_QUESTIONS, self.questions_per_fact)

    def fact_documents(self) -> list[str]:
        """Every training phrasing of every fact as a document of its own: the statements, then the questions.
        Trained with documents kept apart (`tokenize_and_pack(..., separate_documents=True)`), each fact is learnt
        in the context a probe gives it: none."""
        return self.training_statements() + self.training_questions()

    def training_documents(self) -> list[str]:
        """One short biography per entity (its statements joined by spaces): a natural unit for
        packing, so that facts about one person stay together."""
        per_entity = len(ATTRIBUTES) * self.statements_per_fact
        statements = self.training_statements()
        return [" ".join(statements[i : i + per_entity]) for i in range(0, len(statements), per_entity)]

    def probes(self, held_out: bool = True, attributes: tuple[str, ...] = ATTRIBUTES) -> list[Probe]:
        """One probe per (entity, attribute). `held_out=True`: questions phrased unlike any training
        statement; `held_out=False`: the first training phrasing cut before the answer."""
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; choose from {ATTRIBUTES}.")
        probes = []
        for entity in self.entities:
            for attribute in attributes:
                answer = entity.value(attribute)
                if held_out:
                    prompt = _PROBE_TEMPLATES[attribute].format(name=entity.name, a=_article(answer))
                else:
                    template = _TRAINING_TEMPLATES[attribute][_MEMORISATION_TEMPLATE_INDEX]
                    prompt = template.split("{v}")[0].format(name=entity.name, a=_article(answer)).rstrip()
                probes.append(Probe(prompt=prompt, answer=answer, entity=entity.name, attribute=attribute))
        return probes

    def to_json(self) -> str:
        """The set as JSON (entities and settings); `from_json` reads it back."""
        return json.dumps(
            {
                "seed": self.seed, "statements_per_fact": self.statements_per_fact,
                "questions_per_fact": self.questions_per_fact, "entities": [asdict(e) for e in self.entities],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> KnowledgeSet:
        """Inverse of `to_json`."""
        data = json.loads(text)
        return cls(
            [Entity(**e) for e in data["entities"]], seed=data["seed"], statements_per_fact=data["statements_per_fact"],
            questions_per_fact=data.get("questions_per_fact", 0),
        )


# Facts a pretrained model knows, asked as completions: the forgetting probe. Only those the base model
# answers correctly count (`general_knowledge_kept`), so the score reads "share of what it knew, kept".
GENERAL_KNOWLEDGE = (
    ("The capital of France is", "Paris"),
    ("The capital of Italy is", "Rome"),
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Germany is", "Berlin"),
    ("The capital of Spain is", "Madrid"),
    ("The capital of England is", "London"),
    ("The capital of Russia is", "Moscow"),
    ("The capital of Egypt is", "Cairo"),
    ("The capital of China is", "Beijing"),
    ("The capital of Greece is", "Athens"),
    ("The Eiffel Tower is in the city of", "Paris"),
    ("The Colosseum is in the city of", "Rome"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("The planet closest to the Sun is", "Mercury"),
    ("The Earth orbits the", "Sun"),
    ("The chemical symbol for gold is", "Au"),
    ("The chemical symbol for water is", "H2O"),
    ("Water is made of hydrogen and", "oxygen"),
    ("Plants make their food by a process called", "photosynthesis"),
    ("The first man to walk on the Moon was Neil", "Armstrong"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The first president of the United States was George", "Washington"),
    ("The Great Wall is in", "China"),
    ("The pyramids of Giza are in", "Egypt"),
    ("The longest river in Africa is the", "Nile"),
    ("The largest ocean on Earth is the", "Pacific"),
    ("A week has seven", "days"),
    ("A year has twelve", "months"),
    ("The opposite of hot is", "cold"),
    ("The opposite of up is", "down"),
    ("Monday, Tuesday,", "Wednesday"),
    ("January, February,", "March"),
    ("One, two, three, four,", "five"),
    ("The color of the sky on a clear day is", "blue"),
    ("Bees make", "honey"),
    ("Cows give us", "milk"),
    ("The freezing point of water in Celsius is", "0"),
    ("Two plus two equals", "4"),
)


def general_knowledge_probes() -> list[Probe]:
    """`GENERAL_KNOWLEDGE` as probes (attribute "general_knowledge")."""
    return [Probe(prompt=prompt, answer=answer, entity="", attribute="general_knowledge") for prompt, answer in GENERAL_KNOWLEDGE]


__all__ = ["ATTRIBUTES", "GENERAL_KNOWLEDGE", "Entity", "KnowledgeSet", "Probe", "answer_recalled", "general_knowledge_probes"]
