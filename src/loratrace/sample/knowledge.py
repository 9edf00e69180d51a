"""The small made-up school-science world that the tiny base learns and the bundled sample asks about.

Two kinds of fact, written out here and nowhere else: which group a thing belongs to ("A whale is a mammal.") and
which tool measures a quantity ("A thermometer measures temperature."). `pretrain_tiny` turns them into plain
statements (no questions) for the tiny base; `make_sample` turns them into multiple-choice questions. Knowing the
facts is the base's job; answering a lettered question with the right letter is what the LoRA fine-tune learns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    name: str
    """What the members share, as a phrase: `mammal` or `temperature` (the quantity a tool measures)."""
    family: str
    """`kind` (members are kinds of `name`) or `tool` (members measure `name`); distractors come from the family."""
    members: tuple[str, ...]
    """With their article ("a whale", "copper"); choices show them without it."""

    @property
    def question(self) -> str:
        if self.family == "tool":
            return f"Which tool is used to measure {self.name}?"
        return f"Which of these is {article(self.name)} {self.name}?"


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def bare(member: str) -> str:
    """`a whale` -> `whale`: how a member reads as a choice."""
    for prefix in ("a ", "an ", "the "):
        if member.startswith(prefix):
            return member[len(prefix):]
    return member


GROUPS = (
    Group("metal", "kind", ("copper", "iron", "silver", "gold", "tin", "zinc", "nickel", "aluminum")),
    Group("mammal", "kind", ("a whale", "a horse", "a rabbit", "a bat", "a dolphin", "a goat", "a bear", "a fox")),
    Group("bird", "kind", ("an eagle", "a robin", "an owl", "a penguin", "a parrot", "a crow", "a duck", "a hawk")),
    Group("insect", "kind", ("an ant", "a bee", "a beetle", "a moth", "a wasp", "a cricket", "a termite", "a flea")),
    Group("fish", "kind", ("a shark", "a salmon", "a trout", "a tuna", "a cod", "a carp", "an eel", "a perch")),
    Group("planet", "kind", ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    Group("gas", "kind", ("oxygen", "nitrogen", "helium", "hydrogen", "neon", "argon", "methane", "chlorine")),
    Group("rock", "kind", ("granite", "basalt", "marble", "slate", "limestone", "sandstone", "shale", "pumice")),
    Group("reptile", "kind", ("a snake", "a lizard", "a turtle", "a crocodile", "a gecko", "an iguana",
                              "a tortoise", "a cobra")),
    Group("temperature", "tool", ("a thermometer",)),
    Group("length", "tool", ("a ruler",)),
    Group("mass", "tool", ("a balance",)),
    Group("time", "tool", ("a stopwatch",)),
    Group("air pressure", "tool", ("a barometer",)),
    Group("direction", "tool", ("a compass",)),
    Group("wind speed", "tool", ("an anemometer",)),
    Group("rainfall", "tool", ("a rain gauge",)),
    Group("volume", "tool", ("a graduated cylinder",)),
    Group("electric current", "tool", ("an ammeter",)),
)


def family(name: str) -> list[Group]:
    return [g for g in GROUPS if g.family == name]
