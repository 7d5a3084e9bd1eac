"""The tiny world: a seeded knowledge base of fictional entities, its text documents and its QA pairs.

Facts are split into speech-train and speech-test facts; every fact appears in the text documents,
so answering a spoken test question needs knowledge carried from text to speech.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PLACEHOLDER = re.compile(r"\{(\w+)\}")
REQUIRED_ATTRIBUTE_KEYS = ("values", "statements", "questions")


class SourceError(ValueError):
    """The world's text source (lexicon) is missing, empty or malformed."""


def _no_duplicates(path: Path, where: str, words: list) -> None:
    """Two equal names make two entities one person; two equal values make two facts one answer."""
    seen, twice = set(), []
    for word in words:
        if word in seen and word not in twice:
            twice.append(word)
        seen.add(word)
    if twice:
        raise SourceError(f"{path}: {where} lists {', '.join(map(repr, twice))} twice; each entry must be distinct")


def load_source(path: str | Path) -> dict:
    """Read and check the lexicon that the world is built from; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: text source not found (expected the world lexicon YAML; "
                          "restore it with `dvc pull data.dvc` or point params world.source at one)")
    text = path.read_text()
    if not text.strip():
        raise SourceError(f"{path}: text source is empty")
    try:
        source = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SourceError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(source, dict):
        raise SourceError(f"{path}: expected a mapping with keys names, attributes, paralinguistic")
    for key in ("names", "attributes", "paralinguistic"):
        if key not in source:
            raise SourceError(f"{path}: missing key '{key}'")
    for part in ("first", "second"):
        words = source["names"].get(part) if isinstance(source["names"], dict) else None
        if not words:
            raise SourceError(f"{path}: names.{part} must be a non-empty list of words")
    for part in ("first", "second"):
        _no_duplicates(path, f"names.{part}", source["names"][part])
    if not source["attributes"]:
        raise SourceError(f"{path}: attributes is empty")
    for attr, spec in source["attributes"].items():
        for key in REQUIRED_ATTRIBUTE_KEYS:
            if not spec or not spec.get(key):
                raise SourceError(f"{path}: attributes.{attr}.{key} must be a non-empty list")
        _no_duplicates(path, f"attributes.{attr}.values", spec["values"])
        for template in spec["statements"] + spec["questions"]:
            unknown = set(PLACEHOLDER.findall(template)) - {"name", "value"}
            if unknown or "{name}" not in template:
                raise SourceError(f"{path}: attributes.{attr}: template '{template}' must contain "
                                  "{name} and no placeholder other than {name} and {value}")
    para = source["paralinguistic"]
    for key in ("sentences", "replies", "question"):
        if not para.get(key):
            raise SourceError(f"{path}: paralinguistic.{key} is missing or empty")
    return source


@dataclass
class World:
    """Entities, their attribute values, and the facts (entity, attribute) with their speech split."""

    entities: list[dict]
    facts: list[dict]
    attributes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"entities": self.entities, "facts": self.facts, "attributes": self.attributes}

    @classmethod
    def from_json(cls, data: dict) -> "World":
        return cls(entities=data["entities"], facts=data["facts"], attributes=data["attributes"])

    @classmethod
    def load(cls, path: str | Path) -> "World":
        return cls.from_json(json.loads(Path(path).read_text()))


def build_world(source: dict, n_entities: int, test_fraction: float, seed: int) -> World:
    """Draw `n_entities` distinct two-word names and one value per attribute each; split facts.

    The split is stratified per attribute so that every attribute has test facts, and every value
    that a test fact uses also occurs in some training fact (the answer words are then speakable).
    """
    rng = random.Random(seed)
    all_names = [f"{a} {b}" for a, b in itertools.product(source["names"]["first"], source["names"]["second"])]
    if n_entities > len(all_names):
        raise SourceError(f"world.n_entities={n_entities} but the lexicon can form only {len(all_names)} "
                          "distinct names: lower n_entities or add name words")
    names = rng.sample(all_names, n_entities)
    attributes = {attr: list(spec["values"]) for attr, spec in source["attributes"].items()}
    entities = [{"id": f"e{i:03d}", "name": name,
                 "attributes": {attr: rng.choice(values) for attr, values in attributes.items()}}
                for i, name in enumerate(names)]
    facts = []
    for attr in attributes:
        order = list(range(n_entities))
        rng.shuffle(order)
        n_test = round(test_fraction * n_entities)
        test_ids = set(order[:n_test])
        for i, ent in enumerate(entities):
            facts.append({"id": f"{ent['id']}-{attr}", "entity": ent["id"], "name": ent["name"],
                          "attribute": attr, "value": ent["attributes"][attr],
                          "split": "test" if i in test_ids else "train"})
    facts.sort(key=lambda f: f["id"])
    return World(entities=entities, facts=facts, attributes=attributes)


def fill(template: str, name: str, value: str = "") -> str:
    return template.replace("{name}", name).replace("{value}", value)


def text_documents(world: World, source: dict) -> list[str]:
    """Every fact in every statement template: the base LLM's pretraining text."""
    docs = []
    for fact in world.facts:
        for template in source["attributes"][fact["attribute"]]["statements"]:
            docs.append(fill(template, fact["name"], fact["value"]))
    return docs


def emotion_documents(source: dict) -> list[str]:
    """The emotions in words, for the base LLM's pretraining text (and so for the tokenizer: each name one token):
    each named (first, as an answer starts: its own token) and the reply that fits it. The speech stages then learn
    to hear an emotion, as they learn to hear a question, and not a word the LLM never read (a model that had not
    read them answered "how does the speaker sound" with a fact's value, and a name like "neutral" took six tokens,
    more than an answer's budget)."""
    para = source["paralinguistic"]
    return [doc for emotion, reply in para["replies"].items()
            for doc in (f"{emotion} is how the speaker sounds", f"a speaker who sounds {emotion} is answered {reply}")]


# Multi-turn dialogues: a later question names no one and refers back to the person an earlier turn named, by the
# number of turns between them (1: the turn just before; 2: the first of three, another person named in between).
REFERENCES = {1: "that person", 2: "the first person"}


def referring_question(template: str, distance: int) -> str:
    """A question template asked about the person named `distance` turns earlier, by reference, not by name."""
    return fill(template, REFERENCES[distance])


def qa_pairs(world: World, source: dict) -> list[dict]:
    """Every fact asked with every question template; the answer is the attribute value. `referring` holds the same
    question asked by reference instead of by name, per turn distance (a dialogue's later turn)."""
    pairs = []
    for fact in world.facts:
        for k, template in enumerate(source["attributes"][fact["attribute"]]["questions"]):
            pairs.append({"id": f"{fact['id']}-q{k}", "fact": fact["id"], "entity": fact["entity"],
                          "attribute": fact["attribute"], "question": fill(template, fact["name"]),
                          "referring": {str(d): referring_question(template, d) for d in REFERENCES},
                          "answer": fact["value"], "split": fact["split"]})
    return pairs


def all_sentences(world: World, source: dict) -> list[str]:
    """Every sentence the world may speak or write: for the ASR language model and the tokenizer."""
    sentences = text_documents(world, source) + emotion_documents(source)
    sentences += [p["question"] for p in qa_pairs(world, source)]
    sentences += [referring_question(t, d) for spec in source["attributes"].values() for t in spec["questions"]
                  for d in REFERENCES]
    sentences += sorted({f["value"] for f in world.facts})
    para = source["paralinguistic"]
    sentences += [fill(t, e["name"]) for t in para["sentences"] for e in world.entities]
    sentences += list(para["replies"].values()) + [para["question"]]
    return sentences


def vocabulary(sentences: list[str]) -> list[str]:
    return sorted({w for s in sentences for w in s.split()})


def write_world(world: World, source: dict, out_dir: str | Path) -> dict:
    """Write world.json, corpus.txt (the facts' and the emotions' documents), text_qa.jsonl, sentences.txt and
    vocabulary.txt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").write_text(json.dumps(world.to_json(), indent=1))
    docs = text_documents(world, source) + emotion_documents(source)
    (out / "corpus.txt").write_text("\n".join(docs) + "\n")
    pairs = qa_pairs(world, source)
    (out / "text_qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sentences = all_sentences(world, source)
    (out / "sentences.txt").write_text("\n".join(sentences) + "\n")
    vocab = vocabulary(sentences)
    (out / "vocabulary.txt").write_text("\n".join(vocab) + "\n")
    n_test = sum(f["split"] == "test" for f in world.facts)
    return {"entities": len(world.entities), "facts": len(world.facts), "test_facts": n_test,
            "documents": len(docs), "qa_pairs": len(pairs), "vocabulary": len(vocab)}
